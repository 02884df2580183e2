package agent

import (
	"context"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"syscall"

	"github.com/sirupsen/logrus"
)

// Profiling is opt-in and off by default: a debugging aid must not change how a
// production agent answers signals. HeapProfileEnv names the file each SIGUSR1 writes the
// heap profile to; CPUProfileEnv, the file of a CPU profile from the agent's start until
// the first SIGUSR1 (a cold start, then as long as the caller waits).
const (
	HeapProfileEnv = "PODSOCK_HEAP_PROFILE"
	CPUProfileEnv  = "PODSOCK_CPU_PROFILE"
)

// serveProfiles starts what PODSOCK_HEAP_PROFILE and PODSOCK_CPU_PROFILE ask for.
func serveProfiles(ctx context.Context, log logrus.FieldLogger) {
	heapPath, cpuPath := os.Getenv(HeapProfileEnv), os.Getenv(CPUProfileEnv)
	if heapPath == "" && cpuPath == "" {
		return
	}
	var cpu *os.File
	if cpuPath != "" {
		var err error
		if cpu, err = os.Create(cpuPath + ".tmp"); err == nil {
			err = pprof.StartCPUProfile(cpu)
		}
		if err != nil {
			log.WithError(err).Warn("CPU profile")
			cpu = nil
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	go func() {
		defer signal.Stop(sig)
		for {
			select {
			case <-ctx.Done():
				return
			case <-sig:
			}
			if cpu != nil {
				pprof.StopCPUProfile()
				report(log, "CPU", cpuPath, closeAndRename(cpu, cpuPath))
				cpu = nil
			}
			if heapPath != "" {
				report(log, "heap", heapPath, writeHeapProfile(heapPath))
			}
		}
	}()
}

func report(log logrus.FieldLogger, kind, path string, err error) {
	if err != nil {
		log.WithError(err).Warnf("%s profile", kind)
		return
	}
	log.Infof("%s profile written to %s", kind, path)
}

func writeHeapProfile(path string) error {
	// The profile counts what the last GC found live: one now makes it current.
	runtime.GC()
	f, err := os.Create(path + ".tmp")
	if err != nil {
		return err
	}
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return closeAndRename(f, path)
}

// closeAndRename puts a profile written aside in place: whoever waits for the file never
// reads half of it.
func closeAndRename(f *os.File, path string) error {
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
