package agent

import (
	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/config"
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

// logConflicts says, when they first appear, which claims of a frontend lost to another
// source's.
func (a *Agent) logConflicts(conflicts []service.Conflict) {
	for _, c := range conflicts {
		a.log.WithFields(logrus.Fields{
			"key": c.Key, "kept": string(c.Kept.Source) + " " + c.Kept.Name, "dropped": string(c.Dropped.Source) + " " + c.Dropped.Name,
		}).Warn("two sources claim one service; the first in precedence serves it")
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
		})
	}
	return sources, out
}
