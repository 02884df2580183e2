package cli

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/podsock/podsock/internal/statedir"
)

func run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Main(args, &out, &errb, agentNeverStarted)
	return code, out.String(), errb.String()
}

// agentNeverStarted stands in for package agent: no command these tests run may start it.
var agentNeverStarted = Agent{
	Run: func(context.Context, string, *logrus.Logger) error {
		return errors.New("the agent was started")
	},
	RunPreRegistered: func(context.Context, *logrus.Logger) error {
		return errors.New("the pre-registered agent was started")
	},
}

// Bad arguments get exactly one line on stderr and exit code 2; nothing else runs.
func TestBadArgumentsAreOneLine(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"status", "--jsn"}, "flag provided but not defined: -jsn"},
		{[]string{"services", "extra"}, `unexpected argument "extra"`},
		{[]string{"run", "--config"}, "flag needs an argument: -config"},
		{[]string{"version", "--config", "x"}, "flag provided but not defined: -config"},
		{[]string{"sockets", "--proto", "sctp"}, `--proto "sctp": want tcp or udp`},
		{[]string{"sockets", "--backend", "10.0.0.1"}, `--backend "10.0.0.1": want IP:PORT`},
		{[]string{"sockets", "--pod", "web"}, `--pod "web": want NAMESPACE/NAME`},
		{[]string{"pods", "--pod", "a/b"}, "flag provided but not defined: -pod"},
		{[]string{"mount-bpffs"}, "want one absolute directory"},
		{[]string{"mount-bpffs", "sys/fs/bpf"}, "want one absolute directory"},
		{[]string{"check", "extra"}, `unexpected argument "extra"`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			code, stdout, stderr := run(tt.args...)
			if code != exitUsage {
				t.Errorf("exit %d, want %d", code, exitUsage)
			}
			if stdout != "" {
				t.Errorf("printed to stdout: %q", stdout)
			}
			if strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, tt.want) {
				t.Errorf("stderr %q, want one line containing %q", stderr, tt.want)
			}
		})
	}
}

func TestNoArgumentsPrintsUsage(t *testing.T) {
	code, _, stderr := run()
	if code != exitUsage || !strings.Contains(stderr, "usage: podsock") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
}

func TestMissingConfigIsOneLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.toml")
	for _, cmd := range []string{"status", "services", "cleanup"} {
		code, _, stderr := run(cmd, "--config", path)
		if code != exitFail {
			t.Errorf("%s: exit %d, want %d", cmd, code, exitFail)
		}
		want := "podsock " + cmd + ": " + path + ": open: no such file or directory\n"
		if stderr != want {
			t.Errorf("%s: stderr %q, want %q", cmd, stderr, want)
		}
	}
}

// With the rest of the file broken, status still finds the agent through [agent].
func TestStatusWithBrokenConfigFallsBackToAgentSection(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "podsock.toml")
	cfg := "[agent]\nstate_dir = \"" + dir + "\"\n\n[[service]]\nname = \"x\"\nport = 0\n"
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := run("status", "--config", path)
	if code != exitFail {
		t.Fatalf("exit %d with no agent running", code)
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "warning: "+path+":") ||
		!strings.Contains(lines[1], "agent is not running (no answer on "+filepath.Join(dir, "podsock.sock")+")") {
		t.Fatalf("stderr:\n%s", stderr)
	}
}

func TestVersionJSON(t *testing.T) {
	code, stdout, _ := run("version", "--json")
	if code != exitOK || !strings.Contains(stdout, `"version"`) || !strings.Contains(stdout, `"features"`) {
		t.Fatalf("exit %d, stdout %s", code, stdout)
	}
}

// A starting agent has no control socket yet but holds its lock: cleanup must not run.
func TestCleanupRefusesWhileTheStateDirIsLocked(t *testing.T) {
	dir, err := os.MkdirTemp("", "ps-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "podsock.toml")
	cfg := "[agent]\nstate_dir = \"" + dir + "\"\nbpffs = \"" + filepath.Join(dir, "bpffs") + "\"\n"
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	lock, err := statedir.Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	code, _, stderr := run("cleanup", "--config", path)
	if code != exitFail || !strings.Contains(stderr, "another agent is already running") || strings.Count(stderr, "\n") != 1 {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "podsock.lock")); err != nil {
		t.Fatalf("cleanup removed the held lock file: %v", err)
	}
}

// check validates as a reload would, the services file included: 0 and one line on
// stdout for a good config; for a bad one exactly `FILE:LINE: what is wrong` on stderr
// and exit 1. It talks to no agent: the state dir it names does not even exist.
func TestCheck(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	svcs := write("svcs.toml", "[[service]]\nname = \"b\"\nvip = \"10.96.0.21\"\nport = 80\n")
	good := write("good.toml", "[agent]\nstate_dir = \""+filepath.Join(dir, "nowhere")+"\"\nservices_file = \""+svcs+"\"\n"+
		"[metrics]\nlisten = \"127.0.0.1:9965\"\n[[service]]\nname = \"a\"\nvip = \"10.96.0.20\"\nport = 80\n")
	code, stdout, stderr := run("check", "--config", good)
	if code != exitOK || stderr != "" || stdout != good+": ok, 2 services\n" {
		t.Fatalf("good config: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "nowhere")); !os.IsNotExist(err) {
		t.Fatalf("check created the state dir: %v", err)
	}
	badSvcs := write("badsvcs.toml", "[[service]]\nname = \"a\"\nvip = \"10.96.0.22\"\nport = 80\n")
	for _, tc := range []struct{ name, text, want string }{
		{"bad.toml", "[agent]\nlog_level = \"info\"\n[metrics]\nlisten = \"9965\"\n",
			`/bad.toml:4: metrics.listen "9965": must be host:port, e.g. "127.0.0.1:9965"`},
		{"dup.toml", "[agent]\nservices_file = \"" + badSvcs + "\"\n[[service]]\nname = \"a\"\nvip = \"10.96.0.20\"\nport = 80\n",
			"/badsvcs.toml:2: "},
	} {
		code, stdout, stderr := run("check", "--config", write(tc.name, tc.text))
		if code != exitFail || stdout != "" || strings.Count(stderr, "\n") != 1 ||
			!strings.HasPrefix(stderr, dir) || !strings.Contains(stderr, tc.want) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want exit 1 and one line FILE:LINE containing %q", tc.name, code, stdout, stderr, tc.want)
		}
	}
	code, _, stderr = run("check", "--config", filepath.Join(dir, "missing.toml"))
	if code != exitFail || !strings.HasPrefix(stderr, filepath.Join(dir, "missing.toml")+": ") {
		t.Errorf("missing file: exit %d, stderr %q", code, stderr)
	}
}
