package config

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// loadBoth loads path with Load and LoadServicesFile, as the agent did before the Loader.
func loadBoth(path string) (*Config, error) {
	c, err := Load(path)
	if err == nil {
		err = c.LoadServicesFile()
	}
	return c, err
}

// sameLoad fails t unless the loader's result is the one of Load and LoadServicesFile.
func sameLoad(t *testing.T, what string, got *Config, gotErr error, path string) {
	t.Helper()
	want, wantErr := loadBoth(path)
	switch {
	case (gotErr == nil) != (wantErr == nil):
		t.Fatalf("%s: Loader error %v, Load error %v", what, gotErr, wantErr)
	case gotErr != nil:
		if gotErr.Error() != wantErr.Error() {
			t.Fatalf("%s: Loader error %q, Load error %q", what, gotErr, wantErr)
		}
	case !reflect.DeepEqual(got, want):
		t.Fatalf("%s: Loader config differs from Load's:\n%+v\n%+v", what, got, want)
	}
}

func writeFile(t testing.TB, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func benchService(i, port int) string {
	return fmt.Sprintf("[[service]]\nname = \"bench/svc-%d\"\nvip = \"10.%d.%d.%d\"\nport = 80\nbackends = [\"10.88.0.5:%d\"]\n", i, 96+i>>16, i>>8&255, i&255, port)
}

// A reload that changes one service decodes that one and keeps the others as the config
// before holds them, and gives what a fresh Load gives.
func TestLoaderReusesUnchangedServices(t *testing.T) {
	path := filepath.Join(t.TempDir(), "podsock.toml")
	write := func(first int, extra string) {
		var b strings.Builder
		b.WriteString("[agent]\nlog_level = \"warn\"\n[nri]\nenabled = false\n")
		for i := range 1000 {
			port := 8080
			if i == 0 {
				port = first
			}
			b.WriteString(benchService(i, port))
		}
		b.WriteString(extra)
		writeFile(t, path, b.String())
	}
	l := NewLoader()
	write(8080, "")
	before, err := l.Load(path)
	sameLoad(t, "first load", before, err, path)

	write(8081, "")
	after, err := l.Load(path)
	sameLoad(t, "one service changed", after, err, path)
	if &after.Services[0].Backends[0] == &before.Services[0].Backends[0] {
		t.Errorf("the changed service's backends are the old ones")
	}
	for i := 1; i < len(after.Services); i++ {
		if &after.Services[i].Backends[0] != &before.Services[i].Backends[0] {
			t.Fatalf("service %d, unchanged, was decoded again", i)
		}
	}

	// A name or frontend that moves is checked against every other again.
	for _, tt := range []struct{ name, extra string }{
		{"a name used twice", "[[service]]\nname = \"bench/svc-7\"\nvip = \"10.200.0.1\"\nport = 80\n"},
		{"a frontend used twice", "[[service]]\nname = \"bench/new\"\nvip = \"10.96.0.7\"\nport = 80\n"},
		{"a bad new service", "[[service]]\nname = \"bench/new\"\nvip = \"10.200.0.1\"\nport = 0\n"},
		{"a table after the services", "[lb]\nhostns_only = true\n"},
		{"a section whose key is wrong", "[lb]\nhostns = true\n"},
		{"limits the services break", "[limits]\nbackends_per_service = 1\nservices = 999\n"},
		{"a string that hides a header", "[agent]\nstate_dir = \"\"\"/run/x\n[[service]]\nname = \"\"\"\n"},
	} {
		write(8081, tt.extra)
		c, err := l.Load(path)
		sameLoad(t, tt.name, c, err, path)
		// Back to the accepted config: the loader still knows it.
		write(8081, "")
		c, err = l.Load(path)
		sameLoad(t, tt.name+", then undone", c, err, path)
	}
}

// A services file is followed as the main file is, and checked against it.
func TestLoaderServicesFile(t *testing.T) {
	dir := t.TempDir()
	main, extra := filepath.Join(dir, "podsock.toml"), filepath.Join(dir, "services.toml")
	writeFile(t, main, fmt.Sprintf("[agent]\nservices_file = %q\n[limits]\nservices = 5\n%s", extra, benchService(0, 80)))
	l := NewLoader()
	for _, tt := range []struct{ name, services string }{
		{"two services", benchService(1, 80) + benchService(2, 80)},
		{"one changed", benchService(1, 81) + benchService(2, 80)},
		{"a name of the main file", benchService(1, 81) + strings.Replace(benchService(2, 80), "svc-2", "svc-0", 1)},
		{"a frontend of the main file", benchService(1, 81) + strings.Replace(benchService(0, 80), "svc-0", "svc-9", 1)},
		{"over the limit", benchService(1, 81) + benchService(2, 80) + benchService(3, 80) + benchService(4, 80) + benchService(5, 80)},
		{"not only services", benchService(1, 81) + "[lb]\nhostns_only = true\n"},
		{"back to two", benchService(1, 81) + benchService(2, 80)},
	} {
		writeFile(t, extra, tt.services)
		c, err := l.Load(main)
		sameLoad(t, tt.name, c, err, main)
	}
}

func TestServiceChunks(t *testing.T) {
	for _, tt := range []struct {
		name, in string
		ok       bool
		chunks   int
	}{
		{"none", "[agent]\nlog_level = \"info\"\n", true, 0},
		{"two, a table between", "[[service]]\nname = \"a\"\n[lb]\nx = 1\n[[service]]\nname = \"b\"\n", true, 2},
		{"subtables belong to their service", "[[service]]\nname = \"a\"\n[[service.backends]]\naddr = \"x\"\n[service.x]\n[[service]]\n", true, 2},
		{"a header in an array", "[[service]]\nbackends = [\n\"a\",\n[1],\n]\n[[service]]\n", true, 2},
		{"a header in a multi-line string", "[agent]\nx = '''\n[[service]]\n'''\n", true, 0},
		{"a header in a comment", "# [[service]]\n[agent]\n", true, 0},
		{"indented, with spaces and a comment", "  [[ service ]] # one\nname = \"a\"\n", true, 1},
		{"quoted header", "[[\"service\"]]\n", false, 0},
		{"[service]", "[service]\nname = \"a\"\n", false, 0},
		{"subtable of no service", "[service.x]\n", false, 0},
		{"subtable after another table", "[[service]]\n[lb]\n[service.x]\n", false, 0},
		{"open bracket", "[[service]]\nbackends = [\n", false, 0},
		{"open string", "[agent]\nx = \"abc\n", false, 0},
	} {
		_, chunks, ok := serviceChunks([]byte(tt.in))
		if ok != tt.ok || len(chunks) != tt.chunks {
			t.Errorf("%s: %d chunks, ok %v; want %d, %v", tt.name, len(chunks), ok, tt.chunks, tt.ok)
		}
	}
}

// FuzzLoader loads a then b with one Loader: b's result must be Load's, whatever a was.
func FuzzLoader(f *testing.F) {
	f.Add([]byte(example), []byte(example))
	f.Add([]byte(benchService(1, 80)+benchService(2, 80)), []byte(benchService(1, 81)+benchService(2, 80)))
	f.Add([]byte(benchService(1, 80)+benchService(2, 80)), []byte(benchService(2, 80)+benchService(1, 80)))
	f.Add([]byte(benchService(1, 80)), []byte(doc(`[agent]`, `cgroup_root = """`, `[[service]]`, `"""`, `x = 'y'`, `[[service]]`)))
	f.Add([]byte(benchService(1, 80)), []byte(doc(`service = [{name = "a", vip = "fd00::1", port = 1, protocol = "udp", backends = ["[fd00::2]:2"]}]`)))
	f.Add([]byte(benchService(1, 80)), []byte(benchService(1, 80)+"[[service.allow]]\nnamespace = \"x\"\n"))
	f.Add([]byte(benchService(1, 80)), []byte("\xef\xbb\xbf"+benchService(1, 80)))
	f.Add([]byte(benchService(1, 80)), []byte(benchService(1, 80)+"[limits]\nbackends_per_service = 0\n"))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		path := filepath.Join(t.TempDir(), "podsock.toml")
		l := NewLoader()
		writeFile(t, path, string(a))
		c, err := l.Load(path)
		sameLoad(t, "a", c, err, path)
		writeFile(t, path, string(b))
		c, err = l.Load(path)
		sameLoad(t, "b after a", c, err, path)
	})
}

// benchConfig is the agent bench's file of n services, the first with backend port first.
func benchConfig(n, first int) string {
	var sb strings.Builder
	sb.WriteString("[agent]\nlog_level = \"warn\"\n[nri]\nenabled = false\n[limits]\nservices = 131072\nslots = 262144\n")
	for i := range n {
		port := 8080
		if i == 0 {
			port = first
		}
		sb.WriteString(benchService(i, port))
	}
	return sb.String()
}

// BenchmarkLoaderOneChanged reloads 100k services of which one changed each time.
func BenchmarkLoaderOneChanged(b *testing.B) {
	path := filepath.Join(b.TempDir(), "podsock.toml")
	texts := [2]string{benchConfig(100000, 8080), benchConfig(100000, 8081)}
	l := NewLoader()
	writeFile(b, path, texts[0])
	if _, err := l.Load(path); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		b.StopTimer()
		writeFile(b, path, texts[i%2])
		b.StartTimer()
		if _, err := l.Load(path); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoaderCold loads 100k services with a Loader that knows none, as at start.
func BenchmarkLoaderCold(b *testing.B) {
	path := filepath.Join(b.TempDir(), "podsock.toml")
	writeFile(b, path, benchConfig(100000, 8080))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := NewLoader().Load(path); err != nil {
			b.Fatal(err)
		}
	}
}
