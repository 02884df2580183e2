package service

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// Nothing is applied before the first settings; then one apply takes what came before.
func TestReconcilerWaitsForSettings(t *testing.T) {
	var applies atomic.Int32
	r := NewReconciler(func(Plan[string]) error { applies.Add(1); return nil }, nil, Limits{})
	defer r.Close()
	early := r.Publish(Snapshot{Source: SourceKubernetes, Synced: true, Services: []Service{svc("a", "10.96.0.1", 80)}})
	select {
	case err := <-early:
		t.Fatalf("a snapshot was applied before any settings: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if err := <-r.PublishSettings("cfg", Snapshot{Source: SourceFile, Synced: true}); err != nil {
		t.Fatal(err)
	}
	if err := <-early; err != nil || applies.Load() != 1 {
		t.Fatalf("early snapshot: %v after %d applies, want it taken by the one apply", err, applies.Load())
	}
}

// Close lets the apply in progress finish, runs no other, and tells whoever still waits.
func TestReconcilerCloseRunsNoMoreApplies(t *testing.T) {
	var applies atomic.Int32
	started, release := make(chan struct{}), make(chan struct{})
	r := NewReconciler(func(Plan[string]) error {
		if applies.Add(1) == 1 {
			close(started)
			<-release
		}
		return nil
	}, nil, Limits{})
	first := r.PublishSettings("cfg", Snapshot{Source: SourceFile, Synced: true})
	<-started
	second := r.Publish(Snapshot{Source: SourceKubernetes, Synced: true})
	closed := make(chan struct{})
	go func() { r.Close(); close(closed) }()
	time.Sleep(20 * time.Millisecond)
	close(release)
	<-closed
	if err := <-first; err != nil {
		t.Fatalf("the apply in progress: %v", err)
	}
	if err := <-second; !errors.Is(err, ErrClosed) {
		t.Fatalf("the snapshot after close: %v, want ErrClosed", err)
	}
	if n := applies.Load(); n != 1 {
		t.Fatalf("%d applies, want only the one in progress", n)
	}
	if err := <-r.Publish(Snapshot{Source: SourceFile}); !errors.Is(err, ErrClosed) {
		t.Fatalf("publish after close: %v", err)
	}
}

// A failed apply records nothing: status keeps the conflicts and sources of the last one
// that worked, and new settings stay new.
func TestReconcilerFailedApplyChangesNothing(t *testing.T) {
	fail := atomic.Bool{}
	var last Plan[string]
	r := NewReconciler(func(p Plan[string]) error {
		last = p
		if fail.Load() {
			return errors.New("injected")
		}
		return nil
	}, nil, Limits{})
	defer r.Close()
	if err := <-r.PublishSettings("one", Snapshot{Source: SourceFile, Synced: true, Services: []Service{svc("a", "10.96.0.1", 80)}}); err != nil {
		t.Fatal(err)
	}
	fail.Store(true)
	clash := Snapshot{Source: SourceKubernetes, Synced: true, Services: []Service{svc("b", "10.96.0.1", 80)}}
	if err := <-r.PublishSettings("two", Snapshot{Source: SourceFile, Synced: true}); err == nil {
		t.Fatal("the injected failure was not reported")
	}
	if err := <-r.Publish(clash); err == nil || !last.NewSettings || last.Settings != "two" {
		t.Fatalf("retry: %v, plan %+v; want the failed settings still new", err, last)
	}
	if _, conflicts := r.Sources(); len(conflicts) != 0 || servedSource(r, "10.96.0.1:80/tcp") != SourceFile {
		t.Fatalf("after failed applies: conflicts %+v", conflicts)
	}
	fail.Store(false)
	if err := <-r.Publish(clash); err != nil || !last.NewSettings {
		t.Fatalf("apply that works: %v, plan %+v", err, last)
	}
	if err := <-r.Publish(clash); err != nil || last.NewSettings {
		t.Fatalf("after it worked the settings are still new: %+v", last)
	}
	if src := servedSource(r, "10.96.0.1:80/tcp"); src != SourceKubernetes {
		t.Fatalf("10.96.0.1:80/tcp from %q, want kubernetes once the file no longer has it", src)
	}
}

// servedSource is where the service the last apply that worked wrote for key came from
// ("" for none).
func servedSource[S any](r *Reconciler[S], key string) Source {
	s, _ := r.Served(key)
	return s.Source
}

// TestReconcilerServedFollowsTheLastApply: Served answers from the last apply that worked,
// its index built on the first ask after that apply, never from an older one.
func TestReconcilerServedFollowsTheLastApply(t *testing.T) {
	r := NewReconciler(func(Plan[string]) error { return nil }, nil, Limits{})
	defer r.Close()
	if err := <-r.PublishSettings("s", Snapshot{Source: SourceFile, Synced: true, Services: []Service{svc("a", "10.96.0.1", 80)}}); err != nil {
		t.Fatal(err)
	}
	if s, ok := r.Served("10.96.0.1:80/tcp"); !ok || s.Name != "a" {
		t.Fatalf("served after the first apply: %+v %v, want a", s, ok)
	}
	if err := <-r.Publish(Snapshot{Source: SourceFile, Synced: true, Services: []Service{svc("b", "10.96.0.2", 80)}}); err != nil {
		t.Fatal(err)
	}
	if s, ok := r.Served("10.96.0.1:80/tcp"); ok {
		t.Fatalf("a service the last apply dropped is still served: %+v", s)
	}
	if s, ok := r.Served("10.96.0.2:80/tcp"); !ok || s.Name != "b" {
		t.Fatalf("served after the second apply: %+v %v, want b", s, ok)
	}
}
