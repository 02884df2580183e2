// Package statedir is the agent's claim on its state_dir: one lock file that one agent at a
// time holds, which `podsock cleanup` also takes so it never pulls pins from under an agent.
package statedir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// LockName is the lock file in state_dir.
const LockName = "podsock.lock"

// SourcesName is the file in state_dir where the agent records which source each service
// it serves came from, for the next agent.
const SourcesName = "sources.json"

// Lock takes the state dir's lock file (created if missing), failing at once if an agent
// holds it. Closing the file releases it.
func Lock(stateDir string) (*os.File, error) {
	lockPath := filepath.Join(stateDir, LockName)
	lock, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", lockPath, err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another agent is already running with state dir %s", stateDir)
		}
		return nil, fmt.Errorf("lock %s: %w", lockPath, err)
	}
	return lock, nil
}
