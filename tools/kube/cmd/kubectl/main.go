// kubectl as released in k8s.io/kubectl, for the tests and for people debugging them (see
// scripts/install-kube.sh). No client auth plugins: the tests use client certificates.
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	if err := cli.RunNoErrOutput(cmd.NewDefaultKubectlCommand()); err != nil {
		util.CheckErr(err)
	}
}
