package agent

import (
	"slices"
	"testing"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/runtimehooks"
)

func TestTraceFilter(t *testing.T) {
	pods := []runtimehooks.Pod{
		{SandboxID: "s1", Namespace: "shop", Name: "api"},
		{SandboxID: "s2", Namespace: "shop", Name: "frontend"},
	}
	f, err := traceFilter(api.TraceQuery{Pod: "shop/api", Service: "shop/db"}, pods)
	if err != nil || !slices.Equal(f.Pods, []string{"s1"}) || !slices.Equal(f.Services, []string{"shop/db"}) {
		t.Fatalf("filter %+v %v", f, err)
	}
	if f, err := traceFilter(api.TraceQuery{}, pods); err != nil || f.Pods != nil || f.Services != nil {
		t.Fatalf("empty query: %+v %v, want no filter", f, err)
	}
	if _, err := traceFilter(api.TraceQuery{Pod: "shop/nope"}, pods); err == nil {
		t.Fatal("unknown pod: no error")
	}
}
