package testenv

import (
	"fmt"
	"slices"
	"sync"
)

// NetnsSet reaches netns a test or bench created, by cookie, and records which it entered:
// it is the datapath's NetnsSet (Cookies, Enter) without the runtime. Enter wraps unknown,
// the caller's "no handle on that netns" error, for a cookie it does not hold.
type NetnsSet struct {
	unknown error
	byCk    map[uint64]*Netns
	order   []uint64

	mu      sync.Mutex
	entered []uint64
}

func NewNetnsSet(t TB, unknown error, nss ...*Netns) *NetnsSet {
	t.Helper()
	s := &NetnsSet{unknown: unknown, byCk: map[uint64]*Netns{}}
	for _, ns := range nss {
		c := ns.Cookie(t)
		s.byCk[c] = ns
		s.order = append(s.order, c)
	}
	return s
}

// Cookies lists the netns in the order they were given.
func (s *NetnsSet) Cookies() []uint64 { return slices.Clone(s.order) }

func (s *NetnsSet) Enter(cookie uint64, f func() error) error {
	ns, ok := s.byCk[cookie]
	if !ok {
		return fmt.Errorf("netns %d: %w", cookie, s.unknown)
	}
	s.mu.Lock()
	if !slices.Contains(s.entered, cookie) {
		s.entered = append(s.entered, cookie)
	}
	s.mu.Unlock()
	return ns.Do(f)
}

// TakeEntered returns the cookies entered since the last call, sorted, and forgets them.
func (s *NetnsSet) TakeEntered() []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.entered
	s.entered = nil
	slices.Sort(e)
	return e
}
