package agent

import (
	"fmt"
	"strings"

	"github.com/go-logr/logr"
	"github.com/sirupsen/logrus"
	"k8s.io/klog/v2"
)

// routeKlog sends client-go's own log lines (klog) to the agent's log, so an operator
// reads one stream in one format. Its errors are mostly a watch the API server dropped,
// which the Kubernetes source reports in status and retries by itself: a warning, not an
// error. Its verbose lines are for client-go's developers and go to debug.
func routeKlog(log logrus.FieldLogger) {
	klog.SetLogger(logr.New(klogSink{log: log.WithField("from", "client-go")}))
}

type klogSink struct {
	log    logrus.FieldLogger
	name   string
	values []any
}

func (klogSink) Init(logr.RuntimeInfo) {}

// Enabled keeps klog's V(n) lines, n > 0, from being formatted at all.
func (klogSink) Enabled(level int) bool { return level == 0 }

func (s klogSink) Info(_ int, msg string, kv ...any) {
	s.entry(kv).Debug(msg)
}

func (s klogSink) Error(err error, msg string, kv ...any) {
	s.entry(kv).WithError(err).Warn(msg)
}

func (s klogSink) WithValues(kv ...any) logr.LogSink {
	s.values = append(append([]any{}, s.values...), kv...)
	return s
}

func (s klogSink) WithName(name string) logr.LogSink {
	if s.name != "" {
		name = s.name + "." + name
	}
	s.name = name
	return s
}

func (s klogSink) entry(kv []any) logrus.FieldLogger {
	fields := logrus.Fields{}
	if s.name != "" {
		fields["logger"] = s.name
	}
	all := append(append([]any{}, s.values...), kv...)
	for i := 0; i+1 < len(all); i += 2 {
		fields[strings.TrimSpace(fmt.Sprint(all[i]))] = all[i+1]
	}
	return s.log.WithFields(fields)
}
