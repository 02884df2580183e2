package testenv

import (
	"sync/atomic"
	"testing"
	"time"
)

// A signal and a fatal error both run the cleanups; neither may return (and exit the
// process) while the other is still in one.
func TestStandaloneRunCleanupsWaitsForOthers(t *testing.T) {
	var s Standalone
	var finished atomic.Bool
	entered := make(chan struct{})
	s.Cleanup(func() {
		close(entered)
		time.Sleep(100 * time.Millisecond)
		finished.Store(true)
	})
	go s.RunCleanups()
	<-entered
	s.RunCleanups() // nothing left to pop, but one still runs
	if !finished.Load() {
		t.Fatal("RunCleanups returned while another goroutine's cleanup still ran")
	}
}

// A cleanup may register another, and report an error, without deadlocking.
func TestStandaloneCleanupRegistersCleanup(t *testing.T) {
	var s Standalone
	var order []int
	s.Cleanup(func() { order = append(order, 1) })
	s.Cleanup(func() {
		order = append(order, 2)
		s.Cleanup(func() { order = append(order, 3) })
		s.Errorf("reported from a cleanup (expected in this test)")
	})
	s.RunCleanups()
	if len(order) != 3 || order[0] != 2 || order[1] != 3 || order[2] != 1 {
		t.Errorf("cleanups ran in order %v, want [2 3 1]", order)
	}
}
