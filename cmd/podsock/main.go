// Command podsock is the podsock node agent and its command-line client.
package main

import (
	"os"

	"github.com/podsock/podsock/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
