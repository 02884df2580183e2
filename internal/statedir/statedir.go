// Package statedir is the agent's claim on its state_dir: one lock file that one agent at a
// time holds, which `podsock cleanup` also takes so it never pulls pins from under an agent.
package statedir

import (
	"encoding/json"
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

// Sources is which frontend keys ("10.96.0.20:80/tcp") each source other than the file
// serves, as the agent records them in SourcesName: the datapath does not know sources.
type Sources map[string][]string

// WriteSources replaces the record with s, atomically; an empty s removes it.
func WriteSources(stateDir string, s Sources) error {
	path := filepath.Join(stateDir, SourcesName)
	if len(s) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", path, err)
		}
		return nil
	}
	data, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return nil
}

// ReadSources reads the record; without one it is empty.
func ReadSources(stateDir string) (Sources, error) {
	path := filepath.Join(stateDir, SourcesName)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return Sources{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	var s Sources
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}
