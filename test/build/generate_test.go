// Package build tests the project's own build checks.
package build

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podsock/podsock/test/testenv"
)

// `make generate-check` passes on a clean checkout and fails, naming the stale files,
// when a BPF source no longer matches the committed objects.
func TestGenerateCheckCatchesStaleObjects(t *testing.T) {
	if _, err := exec.LookPath("clang-19"); err != nil {
		testenv.SkipOrFail(t, "needs clang-19 (make deps installs it)")
	}
	root, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		testenv.SkipOrFail(t, "not in a git checkout: "+err.Error())
	}
	repo := strings.TrimSpace(string(root))
	dir := filepath.Join(t.TempDir(), "checkout")
	if out, err := exec.Command("git", "-C", repo, "worktree", "add", "--detach", dir, "HEAD").CombinedOutput(); err != nil {
		t.Fatalf("git worktree add: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("git", "-C", repo, "worktree", "remove", "--force", dir).CombinedOutput(); err != nil {
			t.Errorf("git worktree remove: %v: %s", err, out)
		}
	})
	check := func() (string, error) {
		// -o deps: the toolchain is installed already; this checks only the objects.
		out, err := exec.Command("make", "-C", dir, "-o", "deps", "generate-check").CombinedOutput()
		return string(out), err
	}
	if out, err := check(); err != nil {
		t.Fatalf("generate-check on a clean checkout failed: %v\n%s", err, out)
	}
	header := filepath.Join(dir, "bpf", "socklb.h")
	src, err := os.ReadFile(header)
	if err != nil {
		t.Fatal(err)
	}
	stale := strings.Replace(string(src), "#define PODSOCK_MAX_SERVICES 32768", "#define PODSOCK_MAX_SERVICES 32767", 1)
	if stale == string(src) {
		t.Fatal("socklb.h no longer defines PODSOCK_MAX_SERVICES 32768; update this test")
	}
	if err := os.WriteFile(header, []byte(stale), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := check()
	if err == nil || !strings.Contains(out, "generated BPF files are stale") || !strings.Contains(out, "socklb_bpfel.o") {
		t.Fatalf("generate-check with a changed BPF header: %v\n%s\nwant a failure naming socklb_bpfel.o", err, out)
	}

	// The bench's own object (test/revnat) is generated and checked the same way.
	if out, err := exec.Command("git", "-C", dir, "checkout", "--", ".").CombinedOutput(); err != nil {
		t.Fatalf("git checkout: %v: %s", err, out)
	}
	lru := filepath.Join(dir, "bpf", "lrubase.c")
	src, err = os.ReadFile(lru)
	if err != nil {
		t.Fatal(err)
	}
	stale = strings.Replace(string(src), "__uint(max_entries, 1024);", "__uint(max_entries, 1023);", 1)
	if stale == string(src) {
		t.Fatal("lrubase.c no longer sizes its LRU at 1024 entries; update this test")
	}
	if err := os.WriteFile(lru, []byte(stale), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = check()
	if err == nil || !strings.Contains(out, "lrubase_bpfel.o") || strings.Contains(out, "socklb_bpfel.o") {
		t.Fatalf("generate-check with a changed bench BPF source: %v\n%s\nwant a failure naming lrubase_bpfel.o only", err, out)
	}
}
