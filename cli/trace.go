package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podsock/podsock/api"
)

// trace streams decisions until SIGINT or SIGTERM, then says how many it saw and lost.
func trace(c *command) error {
	if c.trace.Pod != "" && strings.Count(c.trace.Pod, "/") != 1 {
		return badArgument{fmt.Errorf("--pod %q: want NAMESPACE/NAME", c.trace.Pod)}
	}
	cl, err := c.client()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var seen, lost uint64
	err = cl.Trace(ctx, c.trace, func(v api.TraceView) error {
		seen++
		if c.json {
			b, err := json.Marshal(v)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(c.stdout, "%s\n", b)
			return err
		}
		_, err := fmt.Fprintln(c.stdout, traceLine(v))
		return err
	}, func(n uint64) {
		lost = n
		fmt.Fprintf(c.stderr, "podsock trace: %d decisions lost so far (trace ring full, or this reader too slow)\n", n)
	})
	fmt.Fprintf(c.stderr, "podsock trace: %d decisions, %d lost\n", seen, lost)
	return err
}

// traceLine is a decision for humans: time, what, who, where to, which service, verdict.
func traceLine(v api.TraceView) string {
	who := "host"
	if v.Pod != "" {
		who = v.Pod
	}
	if v.Container != "" {
		who += " (" + v.Container + ")"
	}
	to := v.VIP
	if v.Backend != "" {
		arrow := " -> "
		if v.Verdict == "reversed" {
			arrow = " <- "
		}
		to += arrow + v.Backend
	}
	verdict := v.Verdict
	if v.Errno != 0 {
		verdict += " " + unix.ErrnoName(unix.Errno(v.Errno))
	}
	t := v.Time
	if ts, err := time.Parse(time.RFC3339Nano, v.Time); err == nil {
		t = ts.Local().Format("15:04:05.000000")
	}
	return fmt.Sprintf("%s %-11s %s %s %s %s %s", t, v.Op, v.Proto, who, to, dash(v.Service), verdict)
}
