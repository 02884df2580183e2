// etcd at the version k8s.io/kubernetes requires, for the tests (see scripts/install-kube.sh).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
