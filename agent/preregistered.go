package agent

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"syscall"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/plugin"
)

// PreRegisteredConfigName names the configuration the runtime hands over in errors and
// logs: it comes from /etc/nri/conf.d/NN-podsock.conf, which the runtime reads for us.
const PreRegisteredConfigName = "nri-config"

// RunPreRegistered is the agent when the runtime launched this binary as a pre-registered
// NRI plugin (/opt/nri/plugins/NN-podsock): the configuration arrives in NRI's Configure.
// The agent answers once the datapath is attached, and applies the services after: the
// runtime bounds Configure by its plugin request timeout (2 s by default), and a large
// config takes longer to apply. It returns when the runtime closes the
// connection (the runtime starts a new instance) or on SIGTERM/SIGINT. SIGHUP cannot
// reload: the runtime owns the configuration, so a change takes a plugin restart.
func RunPreRegistered(ctx context.Context, log *logrus.Logger) error {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	// What the datapath needs whatever the config says is read while the runtime
	// registers the plugin and sends the config.
	datapath.Warm()

	a := newAgent(log)
	defer a.podq.close()
	started := make(chan error, 1)
	configured := false
	var startedWith *config.Config
	a.plugin = plugin.New(plugin.Options{Log: log, Observe: a.metrics.observeNRIEvent, Configure: func(text string) error {
		if configured {
			log.Warn("the runtime configured the plugin again; keeping the running configuration")
			return nil
		}
		cfg, err := config.Parse(PreRegisteredConfigName, []byte(text))
		if err != nil {
			log.Error(err)
			started <- err
			return err
		}
		// The runtime already connected us; the [nri] socket is not used.
		cfg.NRI.Enabled = true
		if err := a.newKubernetesSource(cfg.Kubernetes); err != nil {
			log.Error(err)
			started <- err
			return err
		}
		if _, err := a.start(cfg, nil); err != nil {
			log.Error(err)
			started <- err
			return err
		}
		configured = true
		startedWith = cfg
		started <- nil
		return nil
	}}, a)
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pluginDone := a.runPlugin(pctx)

	if ok, err := awaitConfigure(ctx, log, started, pluginDone, sigs); !ok {
		return err
	}
	defer a.stop()
	// Unregister before the datapath handles go: this runs before stop.
	defer cancel()
	kctx, stopKube := context.WithCancel(ctx)
	waitKube := a.runKubernetes(kctx)
	defer func() { stopKube(); waitKube() }()
	a.applyInitial(startedWith)
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-pluginDone:
			log.WithError(err).Info("the runtime closed the plugin connection; exiting")
			return nil
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				log.Warn("SIGHUP ignored: a pre-registered plugin gets its config from the runtime; restart the plugin to change it")
				continue
			}
			log.Infof("received %s", sig)
			return nil
		}
	}
}

// awaitConfigure waits for the runtime's Configure to have started the agent. It says
// whether to go on; when not, err is what to exit with (nil for a stop signal). A SIGHUP
// meanwhile is ignored, as it is later: the runtime owns the configuration.
func awaitConfigure(ctx context.Context, log logrus.FieldLogger, started <-chan error, pluginDone <-chan error, sigs <-chan os.Signal) (bool, error) {
	for {
		select {
		case err := <-started:
			return err == nil, err
		case err := <-pluginDone:
			return false, errors.Join(errors.New("the runtime never configured the plugin"), err)
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				log.Warn("SIGHUP ignored: a pre-registered plugin gets its config from the runtime")
				continue
			}
			log.Infof("received %s before the runtime configured the plugin", sig)
			return false, nil
		case <-ctx.Done():
			return false, nil
		}
	}
}
