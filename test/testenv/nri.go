package testenv

import (
	"context"
	"os"

	"github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
)

// StartNRIRuntime runs NRI's own runtime side (the adaptation containerd and CRI-O embed)
// in this process on socket, with no plugins of its own to launch: each plugin that
// registers is synchronized with what pods returns then. It stops at cleanup; Stop may
// end it sooner.
func StartNRIRuntime(t TB, socket string, pods func() ([]*api.PodSandbox, []*api.Container)) *adaptation.Adaptation {
	t.Helper()
	empty, err := os.MkdirTemp("", "podsock-nri-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(empty) })
	sync := func(ctx context.Context, cb adaptation.SyncCB) error {
		sbs, ctrs := pods()
		_, err := cb(ctx, sbs, ctrs)
		return err
	}
	update := func(context.Context, []*adaptation.ContainerUpdate) ([]*adaptation.ContainerUpdate, error) {
		return nil, nil
	}
	r, err := adaptation.New("podsock-test-runtime", "v0", sync, update,
		adaptation.WithSocketPath(socket), adaptation.WithPluginPath(empty), adaptation.WithPluginConfigPath(empty))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	return r
}
