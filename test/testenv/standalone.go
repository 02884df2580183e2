package testenv

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/internal/cgroupfs"
)

// Standalone lets the helpers run outside `go test` (the bench and the demo): cleanups run
// in reverse order at the end, a fatal error panics up to Main, and SIGINT/SIGTERM still
// remove every netns, cgroup and pin created so far.
type Standalone struct {
	mu       sync.Mutex
	cleanups []func()
	failed   bool
	// running counts the cleanups some goroutine is in; done is signalled as it falls.
	running int
	done    *sync.Cond
}

func (s *Standalone) Helper() {}

func (s *Standalone) Cleanup(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cleanups = append(s.cleanups, f)
}

func (s *Standalone) Fatal(args ...any) { panic(fmt.Sprint(args...)) }

func (s *Standalone) Fatalf(format string, a ...any) { panic(fmt.Sprintf(format, a...)) }

// Errorf reports a problem and makes Main exit non-zero, but lets the run go on.
func (s *Standalone) Errorf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "error: "+format+"\n", a...)
	s.mu.Lock()
	s.failed = true
	s.mu.Unlock()
}

// RunCleanups undoes everything registered so far, newest first. The cleanups run without
// the lock: they report with Errorf and may register more. It returns only once no
// cleanup runs anywhere: a signal and a fatal error both run them, and the first to exit
// the process would otherwise cut the other's cleanup short (an API server's directory
// left half removed).
func (s *Standalone) RunCleanups() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done == nil {
		s.done = sync.NewCond(&s.mu)
	}
	for len(s.cleanups) > 0 {
		f := s.cleanups[len(s.cleanups)-1]
		s.cleanups = s.cleanups[:len(s.cleanups)-1]
		s.running++
		s.mu.Unlock()
		func() {
			defer func() {
				s.mu.Lock()
				s.running--
				s.done.Broadcast()
			}()
			f()
		}()
	}
	for s.running > 0 {
		s.done.Wait()
	}
}

// Main runs fn, then the cleanups, whatever happens, and exits non-zero on failure.
func (s *Standalone) Main(name string, fn func()) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	go func() {
		sig := <-sigs
		fmt.Fprintf(os.Stderr, "%s: %s, cleaning up\n", name, sig)
		s.RunCleanups()
		os.Exit(1)
	}()
	defer func() {
		r := recover()
		s.RunCleanups()
		if r != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, r)
			os.Exit(1)
		}
		s.mu.Lock()
		failed := s.failed
		s.mu.Unlock()
		if failed {
			fmt.Fprintf(os.Stderr, "%s: failed (errors above)\n", name)
			os.Exit(1)
		}
	}()
	fn()
}

// HomeCgroup is the cgroup v2 the process runs in now, to return to before removing the
// cgroups it entered.
func HomeCgroup() (*Cgroup, error) {
	mnt, err := cgroupfs.Mount()
	if err != nil {
		return nil, err
	}
	rel, err := selfCgroup()
	if err != nil {
		return nil, err
	}
	return &Cgroup{Path: filepath.Join(mnt, rel)}, nil
}
