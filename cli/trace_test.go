package cli

import (
	"strings"
	"testing"

	"github.com/podsock/podsock/api"
)

func TestTraceLine(t *testing.T) {
	for _, c := range []struct {
		v    api.TraceView
		want []string
	}{
		{api.TraceView{Time: "2026-12-02T15:31:02.418113000Z", Op: "connect", Proto: "tcp", Pod: "shop/api", Container: "client",
			VIP: "10.96.0.20:80", Backend: "10.88.0.12:8080", Service: "default/web", Verdict: "balanced"},
			[]string{"connect", "tcp shop/api (client) 10.96.0.20:80 -> 10.88.0.12:8080 default/web balanced"}},
		{api.TraceView{Time: "x", Op: "getpeername", Proto: "tcp", VIP: "10.96.0.20:80", Backend: "10.88.0.12:8080", Service: "default/web", Verdict: "reversed"},
			[]string{"x getpeername tcp host 10.96.0.20:80 <- 10.88.0.12:8080 default/web reversed"}},
		{api.TraceView{Time: "x", Op: "connect", Proto: "tcp", Pod: "shop/frontend", VIP: "10.96.0.30:80", Service: "shop/db", Verdict: "denied", Errno: 1},
			[]string{"shop/frontend 10.96.0.30:80 shop/db denied EPERM"}},
		{api.TraceView{Time: "x", Op: "sendmsg", Proto: "udp", VIP: "10.96.0.53:53", Verdict: "refused", Errno: 111},
			[]string{"10.96.0.53:53 - refused ECONNREFUSED"}},
	} {
		got := traceLine(c.v)
		for _, w := range c.want {
			if !strings.Contains(strings.Join(strings.Fields(got), " "), w) {
				t.Errorf("traceLine(%+v) = %q, want it to contain %q", c.v, got, w)
			}
		}
	}
}

func TestTraceRefusesABadPod(t *testing.T) {
	var out, errOut strings.Builder
	if code := Main([]string{"trace", "--pod", "nonamespace"}, &out, &errOut, Agent{}); code != exitUsage {
		t.Fatalf("exit %d (%s), want %d", code, errOut.String(), exitUsage)
	}
}
