// Command podsock is the podsock node agent and its command-line client.
package main

import (
	"os"
	"runtime"

	"github.com/podsock/podsock/agent"
	"github.com/podsock/podsock/cli"
)

// The main goroutine keeps the main thread: a goroutine that fails to restore its netns
// after entering a pod's exits locked, which ends its thread, except the main thread, which
// Go would keep, stuck in the pod's netns.
func init() { runtime.LockOSThread() }

func main() {
	agent.Version = cli.BuildVersion()
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr, cli.Agent{Run: agent.Run, RunPreRegistered: agent.RunPreRegistered}))
}
