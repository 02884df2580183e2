package revnat

import (
	"testing"

	"github.com/podsock/podsock/test/testenv"
)

// Under more sockets than the LRU holds, with every reply still unread while the others
// send, the LRU has evicted translations the replies need and some show the backend;
// podsock's per-socket storage reverses every one. A churn that fits the LRU shows it
// reversing every reply too, so its failures are evictions, not a broken baseline.
func TestPrivilegedReverseNATUnderChurn(t *testing.T) {
	testenv.RequirePrivileged(t)

	t.Run("fits the LRU", func(t *testing.T) {
		cfg := Config{Sockets: 128, LRUSize: 1024, Rounds: 2, PerService: 1}
		res := Run(t, cfg)
		t.Logf("%d sockets, LRU of %d: LRU wrong %d of %d (lost %d), podsock wrong %d of %d (lost %d)",
			cfg.Sockets, cfg.LRUSize, res.LRU.Wrong, res.LRU.Replies, res.LRU.Lost(), res.Podsock.Wrong, res.Podsock.Replies, res.Podsock.Lost())
		requireReplies(t, "LRU", res.LRU)
		requireReplies(t, "podsock", res.Podsock)
		if res.LRU.Wrong != 0 || res.Podsock.Wrong != 0 {
			t.Fatalf("%d translations in an LRU of %d: LRU %d and podsock %d replies from the wrong source, want 0 and 0",
				cfg.InFlight(), cfg.LRUSize, res.LRU.Wrong, res.Podsock.Wrong)
		}
	})

	t.Run("overflows the LRU", func(t *testing.T) {
		cfg := Config{Sockets: 4096, LRUSize: 1024, Rounds: 2, PerService: 1}
		res := Run(t, cfg)
		t.Logf("%d sockets, LRU of %d (held %d at the end): LRU wrong %d of %d (lost %d) in %v, podsock wrong %d of %d (lost %d) in %v",
			cfg.Sockets, cfg.LRUSize, res.LRUEntries, res.LRU.Wrong, res.LRU.Replies, res.LRU.Lost(), res.LRU.Elapsed,
			res.Podsock.Wrong, res.Podsock.Replies, res.Podsock.Lost(), res.Podsock.Elapsed)
		requireReplies(t, "LRU", res.LRU)
		requireReplies(t, "podsock", res.Podsock)
		if res.Podsock.Wrong != 0 {
			t.Errorf("podsock: %d of %d replies from the wrong source, want 0", res.Podsock.Wrong, res.Podsock.Replies)
		}
		if res.LRU.Wrong == 0 {
			t.Errorf("LRU of %d with %d replies in flight: no reply from the wrong source; the churn no longer overflows it", cfg.LRUSize, cfg.InFlight())
		}
	})
}

// requireReplies fails unless nearly every datagram was answered: a wrong-source count
// over replies that never came proves nothing.
func requireReplies(t *testing.T, name string, c Count) {
	t.Helper()
	if c.Sent == 0 || c.Replies < c.Sent*99/100 {
		t.Fatalf("%s: %d replies to %d datagrams, want at least 99%%", name, c.Replies, c.Sent)
	}
}
