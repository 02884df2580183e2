package config

import (
	"fmt"
	"strings"
	"testing"
)

// BenchmarkParse100kServices parses a config of 100k one-backend services, the shape of
// the agent bench's file.
func BenchmarkParse100kServices(b *testing.B) {
	var sb strings.Builder
	sb.WriteString("[agent]\nlog_level = \"warn\"\n[nri]\nenabled = false\n[limits]\nservices = 131072\nslots = 262144\n")
	for i := range 100000 {
		fmt.Fprintf(&sb, "[[service]]\nname = \"bench/svc-%d\"\nvip = \"10.%d.%d.%d\"\nport = 80\nbackends = [\"10.88.0.5:8080\"]\n", i, 96+i>>16, i>>8&255, i&255)
	}
	data := []byte(sb.String())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse("bench.toml", data); err != nil {
			b.Fatal(err)
		}
	}
}
