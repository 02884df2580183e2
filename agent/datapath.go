package agent

import (
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/terminator"
)

// datapathOps is what the agent does with the datapath: *datapath.Datapath on a node, a
// fake that records what was written in the tests of the agent's logic, which then need
// no root.
type datapathOps interface {
	// The writes: services, pods and the settings of [lb].
	ApplyWith([]datapath.Service, datapath.ApplyOptions) (datapath.ApplyResult, error)
	ApplyChanges([]datapath.Change, datapath.ApplyOptions) (datapath.ApplyResult, bool, error)
	AllowedSandboxes(service string) []string
	SetHostnsOnly(bool) error
	SetServiceCounters(bool) error
	SyncPods([]datapath.Pod) (datapath.PodSyncResult, error)
	SetPod(datapath.Pod) error
	RemovePod(sandboxID string) error
	// Socket termination and its counts.
	terminator.Datapath
	// What status and the listings read.
	Services() ([]datapath.Service, error)
	Counts() (services, backends int)
	Stats() (datapath.Stats, error)
	ServiceCounts() ([]datapath.ServiceCount, error)
	Attached() bool
	PinsOwned() error
	PinDir() string
	AdoptedLinks() int
	IteratorFeatures() []datapath.Feature
	WaitLoaded()
	MapStats() ([]datapath.MapStat, error)
	ListErr(proto uint8) error
	Sockets(datapath.NetnsSet, datapath.SocketFilter, func(datapath.Socket) error) (datapath.WalkStats, error)
	// Tracing of LB decisions.
	Trace(datapath.TraceFilter) (*datapath.Tracer, error)
	TraceFeature() datapath.Feature
	MapCountFeature() datapath.Feature
	Close() error
}

var _ datapathOps = (*datapath.Datapath)(nil)
