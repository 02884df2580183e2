package agent

import (
	"maps"
	"slices"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/config"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/statedir"
	"github.com/podsock/podsock/service"
)

// sourceReconciler merges what the service sources want; a.apply, its only caller, is
// the only writer of services into the datapath.
type sourceReconciler = service.Reconciler[*config.Config]

// publishConfig hands a new file config over: its services are the file source's
// snapshot, its [lb] section the settings of every apply from now on. The channel says how
// the apply that took it went.
func (a *Agent) publishConfig(cfg *config.Config) <-chan error {
	return a.sources.PublishSettings(cfg, service.Snapshot{Source: service.SourceFile, Services: cfg.Services, Synced: true})
}

// logConflicts says, when they first appear, which services were left out and why.
func (a *Agent) logConflicts(conflicts []service.Conflict) {
	for _, c := range conflicts {
		log := a.log.WithFields(logrus.Fields{"key": c.Key, "source": c.Dropped.Source, "service": c.Dropped.Name, "reason": c.Reason})
		if c.Kept.Name != "" {
			log = log.WithField("kept", string(c.Kept.Source)+" "+c.Kept.Name)
		}
		log.Warn("service left out")
	}
}

// sourceStatus is what `status` shows of the sources and their conflicts.
func (a *Agent) sourceStatus() ([]api.SourceStatus, []api.ServiceConflict) {
	states, conflicts := a.sources.Sources()
	sources := make([]api.SourceStatus, 0, len(states))
	for _, s := range states {
		st := api.SourceStatus{Name: string(s.Source), Synced: s.Synced, Services: s.Services}
		a.kubernetesStatus(&st)
		sources = append(sources, st)
	}
	out := make([]api.ServiceConflict, 0, len(conflicts))
	for _, c := range conflicts {
		out = append(out, api.ServiceConflict{
			Key:     c.Key,
			Kept:    api.ServiceRef{Source: string(c.Kept.Source), Name: c.Kept.Name},
			Dropped: api.ServiceRef{Source: string(c.Dropped.Source), Name: c.Dropped.Name},
			Reason:  c.Reason,
		})
	}
	return sources, out
}

// recordSources records in state_dir which services a source other than the file
// serves, after an apply that worked, when that changed: the next agent keeps them until
// their source has synced. Only the reconciler calls it.
func (a *Agent) recordSources(svcs []service.Service) {
	if a.settings.StateDir == "" {
		return
	}
	bySource := statedir.Sources{}
	for _, s := range svcs {
		if src := string(s.From()); s.From() != service.SourceFile {
			bySource[src] = append(bySource[src], s.Key())
		}
	}
	for _, keys := range bySource {
		slices.Sort(keys)
	}
	if maps.EqualFunc(bySource, a.recordedSources, slices.Equal) && a.recordedSources != nil {
		return
	}
	if err := statedir.WriteSources(a.settings.StateDir, bySource); err != nil {
		a.log.WithError(err).Warn("record the sources of the services served")
		return
	}
	a.recordedSources = bySource
}

// adoptRecordedSources hands the reconciler the services a previous agent served for each
// source other than the file, as the datapath still serves them, so that they stay until
// their source has synced.
func (a *Agent) adoptRecordedSources() {
	bySource, err := statedir.ReadSources(a.settings.StateDir)
	if err != nil {
		a.log.WithError(err).Warn("every service served counts as the file's")
		return
	}
	a.recordedSources = bySource
	if len(bySource) == 0 {
		return
	}
	served, err := a.dp.Services()
	if err != nil {
		a.log.WithError(err).Warn("read the services served; every service counts as the file's")
		return
	}
	byKey := make(map[string]datapath.Service, len(served))
	for _, s := range served {
		byKey[s.Key()] = s
	}
	for src, keys := range bySource {
		var adopted []service.Service
		for _, k := range keys {
			if s, ok := byKey[k]; ok {
				adopted = append(adopted, fromDatapath(s, service.Source(src)))
			}
		}
		a.sources.Adopt(service.Source(src), adopted)
		a.log.WithFields(logrus.Fields{"source": src, "services": len(adopted)}).Info("kept until the source has synced")
	}
}

// fromDatapath is a served service as the model has it. Only what the datapath keeps
// comes back: a source other than the file has no allow-lists.
func fromDatapath(s datapath.Service, src service.Source) service.Service {
	out := service.Service{
		Name: s.Name, Source: src, VIP: s.VIP, Port: s.Port, Protocol: service.Protocol(datapath.ProtoName(s.Proto)),
		Affinity: service.AffinityNone,
	}
	switch {
	case s.Policy.AffinityPod && s.Policy.AffinityHost:
		out.Affinity, out.AffinityTimeout = service.AffinityClient, s.Policy.AffinityTimeout
	case s.Policy.AffinityPod:
		out.Affinity = service.AffinityPod
	}
	out.HostOnly = s.HostOnly
	for _, b := range s.Backends {
		out.Backends = append(out.Backends, service.Backend{Addr: b.Addr, Weight: b.Weight})
	}
	return out
}
