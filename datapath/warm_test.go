package datapath

import "testing"

// A warmed spec goes to one Load only: the Load changes the spec it takes (sizes, epoch,
// trace ring), so a second one must read its own.
func TestWarmIsTakenOnce(t *testing.T) {
	Warm()
	Warm() // a second call while one is pending starts nothing more
	first, kernel, err := takeWarm()
	if err != nil {
		t.Fatalf("warmed spec: %v", err)
	}
	if first == nil || kernel == nil {
		t.Fatal("warm gave no spec or no BTF cache")
	}
	if _, ok := first.Programs["podsock_connect4"]; !ok {
		t.Fatal("warmed spec lacks podsock_connect4")
	}
	second, _, err := takeWarm()
	if err != nil {
		t.Fatalf("spec read after the warm one was taken: %v", err)
	}
	if second == first {
		t.Fatal("two Loads were given the same spec")
	}
}
