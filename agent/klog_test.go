package agent

import (
	"errors"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"k8s.io/klog/v2"
)

// client-go's errors reach the agent's log as warnings with their key/values, its plain
// lines as debug, and its verbose ones not at all.
func TestKlogGoesToTheAgentLog(t *testing.T) {
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	routeKlog(log)
	defer klog.ClearLogger()
	klog.ErrorS(errors.New("connection refused"), "watch failed", "resource", "services")
	klog.InfoS("starting reflector", "resource", "endpointslices")
	klog.V(4).InfoS("too verbose")
	klog.Flush()
	entries := hook.AllEntries()
	if len(entries) != 2 {
		t.Fatalf("%d entries, want 2: %v", len(entries), entries)
	}
	warn, info := entries[0], entries[1]
	if warn.Level != logrus.WarnLevel || warn.Message != "watch failed" || warn.Data["resource"] != "services" ||
		warn.Data["from"] != "client-go" || warn.Data[logrus.ErrorKey].(error).Error() != "connection refused" {
		t.Fatalf("klog error became %v %q %v", warn.Level, warn.Message, warn.Data)
	}
	if info.Level != logrus.DebugLevel || info.Message != "starting reflector" || info.Data["resource"] != "endpointslices" {
		t.Fatalf("klog info became %v %q %v", info.Level, info.Message, info.Data)
	}
}
