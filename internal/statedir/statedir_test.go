package statedir

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// The record of the sources reads back as written, an empty one removes the file, and a
// state dir without one reads as empty.
func TestSourcesRecord(t *testing.T) {
	dir := t.TempDir()
	if s, err := ReadSources(dir); err != nil || len(s) != 0 {
		t.Fatalf("no record: %v, %v; want empty", s, err)
	}
	want := Sources{"kubernetes": {"10.96.0.20:80/tcp", "10.96.0.21:53/udp"}}
	if err := WriteSources(dir, want); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadSources(dir); err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("read back %v (%v), want %v", got, err, want)
	}
	if err := WriteSources(dir, Sources{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, SourcesName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("an empty record left the file: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, SourcesName), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSources(dir); err == nil {
		t.Fatal("a broken record read without an error")
	}
}
