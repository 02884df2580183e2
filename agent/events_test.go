package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"reflect"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestPodQueueKeepsOrderAndBoundsWaiting(t *testing.T) {
	q := newPodQueue()
	go q.run()
	defer q.close()
	release := make(chan struct{})
	var order []int
	if q.do(20*time.Millisecond, func() { <-release; order = append(order, 1) }) {
		t.Fatal("a blocked op reported completion")
	}
	var ran atomic.Bool
	start := time.Now()
	if q.do(20*time.Millisecond, func() { order = append(order, 2); ran.Store(true) }) {
		t.Fatal("an op queued behind a blocked one reported completion")
	}
	if waited := time.Since(start); waited > time.Second {
		t.Fatalf("do waited %s, want about its 20ms budget", waited)
	}
	close(release)
	if !q.do(time.Second, func() { order = append(order, 3) }) {
		t.Fatal("op after the blocked ones did not complete")
	}
	if !ran.Load() || !reflect.DeepEqual(order, []int{1, 2, 3}) {
		t.Fatalf("ops ran in order %v, want [1 2 3]", order)
	}
}

func TestOnlyNotExist(t *testing.T) {
	missing := fmt.Errorf("container c1 of pod a/b: %w", errors.Join(
		fmt.Errorf("cgroup /x does not exist: %w", fs.ErrNotExist),
		fmt.Errorf("pod cgroup /y: %w", fs.ErrNotExist)))
	mixed := fmt.Errorf("container c1 of pod a/b: %w", errors.Join(
		fmt.Errorf("cgroup /x does not exist: %w", fs.ErrNotExist),
		errors.New("bad slice name")))
	for _, c := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{missing, true},
		{mixed, false},
		{errors.New("bad slice name"), false},
		{fmt.Errorf("x: %w", fs.ErrNotExist), true},
	} {
		if got := onlyNotExist(c.err); got != c.want {
			t.Errorf("onlyNotExist(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// Before the runtime has configured a pre-registered plugin, SIGHUP is ignored (it used to
// end the agent), a stop signal ends it cleanly, and a failed Configure is its error.
func TestAwaitConfigure(t *testing.T) {
	sigs := make(chan os.Signal, 2)
	started := make(chan error, 1)
	sigs <- syscall.SIGHUP
	go func() {
		time.Sleep(20 * time.Millisecond)
		started <- nil
	}()
	if ok, err := awaitConfigure(context.Background(), quietLog(), started, nil, sigs); !ok || err != nil {
		t.Fatalf("SIGHUP then Configure: go on = %v (%v), want to go on", ok, err)
	}
	sigs <- syscall.SIGTERM
	if ok, err := awaitConfigure(context.Background(), quietLog(), make(chan error), nil, sigs); ok || err != nil {
		t.Fatalf("SIGTERM: go on = %v (%v), want a clean exit", ok, err)
	}
	failed := make(chan error, 1)
	failed <- errors.New("config: bad")
	if ok, err := awaitConfigure(context.Background(), quietLog(), failed, nil, sigs); ok || err == nil {
		t.Fatalf("failed Configure: go on = %v (%v), want its error", ok, err)
	}
	done := make(chan error, 1)
	done <- errors.New("connection closed")
	if ok, err := awaitConfigure(context.Background(), quietLog(), make(chan error), done, sigs); ok || err == nil || !strings.Contains(err.Error(), "never configured") {
		t.Fatalf("runtime gone: go on = %v (%v)", ok, err)
	}
}
