package main

import (
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/podsock/podsock/test/revnat"
)

var (
	revnatSockets = flag.Int("revnat-sockets", 8192, "unconnected UDP sockets open at once in the reverse NAT churn")
	revnatLRU     = flag.String("revnat-lru", "1024,16384,65536", "sizes of the LRU baseline's reverse-NAT map, comma-separated")
	revnatRounds  = flag.Int("revnat-rounds", 3, "rounds of the reverse NAT churn, a quarter of the sockets replaced after each")
)

// printRevNAT churns more UDP sockets than the LRU holds, with every reply unread until
// all have sent, and counts the replies whose source is not the VIP, the LRU's against
// podsock's.
func (e *env) printRevNAT() {
	fmt.Printf("\nUDP reverse NAT under churn: %d unconnected sockets, 2 services each, %d rounds (a quarter of the sockets replaced after each); podsock's socket storage vs an LRU keyed by {socket cookie, backend}\n",
		*revnatSockets, *revnatRounds)
	for _, f := range strings.Split(*revnatLRU, ",") {
		size, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || size <= 0 {
			e.Fatalf("-revnat-lru %q: want positive sizes, comma-separated", *revnatLRU)
		}
		cfg := revnat.Config{Sockets: *revnatSockets, LRUSize: size, Rounds: *revnatRounds, PerService: 1}
		r := revnat.Run(e, cfg)
		verdict := "met"
		if r.Podsock.Wrong != 0 {
			verdict = "missed"
		}
		fmt.Printf("UDP reverse NAT under churn (%d sockets, LRU of %d): LRU wrong source %d of %d replies, podsock %d of %d (target: podsock 0: %s)\n",
			cfg.Sockets, size, r.LRU.Wrong, r.LRU.Replies, r.Podsock.Wrong, r.Podsock.Replies, verdict)
		fmt.Printf("  %d translations in flight per round; LRU held %d at the end; lost replies: LRU %d, podsock %d; churn took LRU %v, podsock %v\n",
			cfg.InFlight(), r.LRUEntries, r.LRU.Lost(), r.Podsock.Lost(), r.LRU.Elapsed.Round(time.Millisecond), r.Podsock.Elapsed.Round(time.Millisecond))
	}
}
