package kubesource

import (
	"os/exec"
	"strings"
	"testing"
)

// The agent's binary must not link client-go's clientset (every API group, registered in
// a scheme at start): it cost each agent 9 MiB of RSS, Kubernetes on or off.
func TestAgentLinksNoClientset(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/podsock/podsock/cmd/podsock").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if pkg == "k8s.io/client-go/kubernetes" || strings.HasPrefix(pkg, "k8s.io/client-go/kubernetes/") ||
			strings.HasPrefix(pkg, "k8s.io/client-go/informers") {
			t.Errorf("cmd/podsock links %s", pkg)
		}
		if strings.HasPrefix(pkg, "k8s.io/api/") && pkg != "k8s.io/api/core/v1" && pkg != "k8s.io/api/discovery/v1" {
			t.Errorf("cmd/podsock links %s, an API group the source does not read", pkg)
		}
	}
}
