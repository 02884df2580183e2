package agent

import (
	"encoding/json"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
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
		sources = append(sources, api.SourceStatus{Name: string(s.Source), Synced: s.Synced, Services: s.Services})
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

// sourcesFile, in state_dir, records which source each served service came from, other
// than the file. The next agent reads it to keep another source's services until that
// source has synced: the datapath itself does not know sources.
const sourcesFile = statedir.SourcesName

// recordSources writes sourcesFile after an apply that worked, when what it records
// changed. Only the reconciler calls it.
func (a *Agent) recordSources(svcs []service.Service) {
	if a.settings.StateDir == "" {
		return
	}
	bySource := map[service.Source][]string{}
	for _, s := range svcs {
		if s.From() != service.SourceFile {
			bySource[s.From()] = append(bySource[s.From()], s.Key())
		}
	}
	for _, keys := range bySource {
		slices.Sort(keys)
	}
	path := filepath.Join(a.settings.StateDir, sourcesFile)
	if len(bySource) == 0 {
		// Nothing but the file's: there is nothing to record, and no file to leave.
		if a.recordedSources != "" {
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				a.log.WithError(err).Warn("remove the record of the services' sources")
				return
			}
			a.recordedSources = ""
		}
		return
	}
	data, err := json.Marshal(bySource)
	if err != nil || string(data) == a.recordedSources {
		return
	}
	tmp := path + ".new"
	err = os.WriteFile(tmp, data, 0o600)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		a.log.WithError(err).Warn("record the sources of the services served")
		return
	}
	a.recordedSources = string(data)
}

// adoptRecordedSources hands the reconciler the services a previous agent served for each
// source other than the file, as the datapath still serves them, so that they stay until
// their source has synced.
func (a *Agent) adoptRecordedSources() {
	data, err := os.ReadFile(filepath.Join(a.settings.StateDir, sourcesFile))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var bySource map[service.Source][]string
	if err == nil {
		err = json.Unmarshal(data, &bySource)
	}
	if err != nil {
		a.log.WithError(err).Warn("read the sources of the services served; every service counts as the file's")
		return
	}
	served, err := a.dp.Services()
	if err != nil {
		a.log.WithError(err).Warn("read the services served; every service counts as the file's")
		return
	}
	byKey := make(map[string]datapath.Service, len(served))
	for _, s := range served {
		byKey[netip.AddrPortFrom(s.VIP, s.Port).String()+"/"+datapath.ProtoName(s.Proto)] = s
	}
	for src, keys := range bySource {
		var adopted []service.Service
		for _, k := range keys {
			if s, ok := byKey[k]; ok {
				adopted = append(adopted, fromDatapath(s, src))
			}
		}
		a.sources.Adopt(src, adopted)
		a.log.WithFields(logrus.Fields{"source": src, "services": len(adopted)}).Info("kept until the source has synced")
	}
	a.recordedSources = string(data)
}

// fromDatapath is a served service as the model has it. Only what the datapath keeps
// comes back: a source other than the file has no allow-lists.
func fromDatapath(s datapath.Service, src service.Source) service.Service {
	out := service.Service{
		Name: s.Name, Source: src, VIP: s.VIP, Port: s.Port, Protocol: service.Protocol(datapath.ProtoName(s.Proto)),
		Affinity: service.AffinityNone,
	}
	if s.Policy.AffinityPod {
		out.Affinity = service.AffinityPod
	}
	for _, b := range s.Backends {
		out.Backends = append(out.Backends, service.Backend{Addr: b.Addr, Weight: b.Weight})
	}
	return out
}
