package config

import (
	"reflect"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

// FuzzFastDecode: whatever fastDecode accepts, the TOML library decodes to the same
// document.
func FuzzFastDecode(f *testing.F) {
	for _, s := range []string{
		"[agent]\nlog_level = \"warn\"\n[nri]\nenabled = false\n[[service]]\nname = \"a/b\"\nvip = \"10.96.0.1\"\nport = 80\nbackends = [\"10.88.0.5:8080\", \"[fd00::1]:80\"]\n",
		"# c\r\n[limits]\r\nservices = 131072\r\n\r\n[[service]]\nport = -1\n[[service]]\nport = 0\n",
		"a = [1, 2,]\nb = [ \"x\" , 3 ]\n",
		"[a]\n[a]\n", "[a]\n[[a]]\n", "a = 1\na = 2\n", "x = 01\n", "x = \"\\u0041\"\n", "x = []\n", "[[a]]\n[a]\n",
		"x = \"a\tb\"\n", "x = \"\xff\"\n", "\ufeffx = 1\n", "x = 9223372036854775808\n", "x = -0\n", "x = true\ny = false\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, ok := fastDecode(data)
		if !ok {
			return
		}
		var want map[string]any
		if _, err := toml.Decode(string(data), &want); err != nil {
			t.Fatalf("fastDecode accepted what the TOML library rejects (%v):\n%q", err, data)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("fastDecode and the TOML library differ for %q:\nfast %#v\ntoml %#v", data, got, want)
		}
	})
}

// TestFastDecodeTakesGeneratedConfigs: the shape the bench and generators write decodes on
// the fast path, so a large file does not fall back to the slow one.
func TestFastDecodeTakesGeneratedConfigs(t *testing.T) {
	var b strings.Builder
	b.WriteString("[agent]\nlog_level = \"warn\"\n[nri]\nenabled = false\n[limits]\nservices = 131072\n")
	for range 3 {
		b.WriteString("[[service]]\nname = \"bench/svc\"\nvip = \"10.96.0.1\"\nport = 80\nprotocol = \"udp\"\nbackends = [\"10.88.0.5:8080\"]\n")
	}
	doc, ok := fastDecode([]byte(b.String()))
	if !ok {
		t.Fatal("fastDecode gave up on a generated config")
	}
	if n := len(doc["service"].([]map[string]any)); n != 3 {
		t.Fatalf("%d services, want 3", n)
	}
}
