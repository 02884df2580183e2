package api

import (
	"strings"
	"testing"
)

// FuzzSocketQuery: the control socket's `sockets` query, whatever a client sends, parses
// or fails with one line naming the bad value; what parses is what was asked.
func FuzzSocketQuery(f *testing.F) {
	f.Add("default/web", "10.88.0.5:8080", "tcp")
	f.Add("", "[fd00::5]:53", "udp")
	f.Add("a/b/c", "10.88.0.5", "sctp")
	f.Add("\n/", "[::1%eth0]:1", "")
	f.Fuzz(func(t *testing.T, pod, backend, proto string) {
		q := SocketQuery{Pod: pod, Backend: backend, Proto: proto}
		p, err := q.Parse()
		if err != nil {
			if msg := err.Error(); strings.Contains(msg, "\n") && !strings.ContainsAny(pod+backend+proto, "\n") {
				t.Fatalf("error of more than one line: %q", msg)
			}
			return
		}
		switch {
		case p.Proto != proto:
			t.Fatalf("--proto %q parsed as %q", proto, p.Proto)
		case proto != "" && proto != "tcp" && proto != "udp":
			t.Fatalf("--proto %q accepted", proto)
		case backend == "" && p.Backend.IsValid(), backend != "" && !p.Backend.IsValid():
			t.Fatalf("--backend %q parsed as %v", backend, p.Backend)
		case p.Pod != pod || (pod != "" && strings.Count(pod, "/") != 1):
			t.Fatalf("--pod %q parsed as %q", pod, p.Pod)
		}
	})
}
