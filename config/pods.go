package config

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/podsock/podsock/service"
)

// SkipLBAnnotation, set to "true" on a pod, makes socket-LB leave that pod's
// sockets alone, as a match in [[lb.skip]] does.
const SkipLBAnnotation = "podsock.io/skip-lb"

// SkipsLB reports whether socket-LB leaves the sockets of this pod alone: its
// connects and sends to a service VIP go to the VIP untranslated, for a
// service mesh sidecar to handle. That is so when the pod's SkipLBAnnotation
// is exactly "true" (unless SkipAnnotation is off) or when any Skip selector
// matches the pod. Only the exact
// string "true" counts: "True", "1", "yes", "false" and any other value are
// not a skip, and are not an error either (annotations are not podsock's
// config to reject).
//
// SkipsLB does not look at HostnsOnly, which leaves every pod alone anyway.
func (l LB) SkipsLB(namespace string, labels, annotations map[string]string) bool {
	return (l.SkipAnnotation && annotations[SkipLBAnnotation] == "true") || service.AnyMatches(l.Skip, namespace, labels)
}

// fileAffinity reports whether a file may ask for a: "client" is Kubernetes' ClientIP
// affinity, which only that source hands over.
func fileAffinity(a service.Affinity) bool {
	return a == service.AffinityNone || a == service.AffinityPod
}

func affinityMsg(label string, a service.Affinity) string {
	return fmt.Sprintf("%s: affinity %q is not %q or %q", label, a, service.AffinityNone, service.AffinityPod)
}

// checkSelector adds what is wrong with sel, found at at and called what in
// messages ("lb.skip #1", `service "web": allow #2`).
func (ps *problems) checkSelector(at keyPath, what string, sel service.Selector) {
	if sel.Namespace == "" && len(sel.Labels) == 0 {
		ps.add(at, "%s selects every pod; give a namespace, labels or both", what)
	}
	if n := sel.Namespace; n != "" && !isDNSLabel(n) {
		ps.add(at.key("namespace"), "%s: namespace %q is not a Kubernetes namespace name (at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit)", what, n)
	}
	labels := at.key("labels")
	for _, k := range slices.Sorted(maps.Keys(sel.Labels)) {
		if msg := checkLabelKey(k); msg != "" {
			ps.add(labels.key(k), "%s: label key %q: %s", what, k, msg)
		} else if v := sel.Labels[k]; v != "" && !isLabelName(v) {
			ps.add(labels.key(k), "%s: label %q: value %q must be empty or %s", what, k, v, labelNameRule)
		}
	}
}

const labelNameRule = "1 to 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"

// checkLabelKey returns what is wrong with a Kubernetes label key, or "": an
// optional DNS subdomain prefix and '/', then a name.
func checkLabelKey(k string) string {
	prefix, name, hasPrefix := strings.Cut(k, "/")
	if !hasPrefix {
		if !isLabelName(k) {
			return "must be " + labelNameRule + ", optionally after a DNS subdomain prefix and '/'"
		}
		return ""
	}
	if len(prefix) > 253 || !isDNSSubdomain(prefix) {
		return fmt.Sprintf("prefix %q must be a DNS subdomain (at most 253 lower-case letters, digits, '-' and '.', as in example.com)", prefix)
	}
	if !isLabelName(name) {
		return fmt.Sprintf("name %q after the prefix must be %s", name, labelNameRule)
	}
	return ""
}

// isLabelName reports whether s is a non-empty Kubernetes label name or value.
func isLabelName(s string) bool {
	if s == "" || len(s) > 63 || !isAlnum(s[0]) || !isAlnum(s[len(s)-1]) {
		return false
	}
	return !strings.ContainsFunc(s, func(r rune) bool {
		return r > 0x7f || !isAlnum(byte(r)) && r != '-' && r != '_' && r != '.'
	})
}

// isDNSLabel reports whether s is an RFC 1123 label of at most 63 bytes, as
// Kubernetes namespace names are.
func isDNSLabel(s string) bool { return len(s) <= 63 && isLowerAlnumDash(s) }

// isDNSSubdomain reports whether s is dot-separated RFC 1123 labels; like
// Kubernetes, it bounds only the total length, which the caller checks.
func isDNSSubdomain(s string) bool {
	for l := range strings.SplitSeq(s, ".") {
		if !isLowerAlnumDash(l) {
			return false
		}
	}
	return true
}

// isLowerAlnumDash reports whether s is non-empty lower-case letters, digits
// and '-', starting and ending with a letter or digit.
func isLowerAlnumDash(s string) bool {
	if s == "" || !isLowerAlnum(s[0]) || !isLowerAlnum(s[len(s)-1]) {
		return false
	}
	return !strings.ContainsFunc(s, func(r rune) bool { return r > 0x7f || !isLowerAlnum(byte(r)) && r != '-' })
}

func isLowerAlnum(c byte) bool { return c >= 'a' && c <= 'z' || isDigit(c) }
func isAlnum(c byte) bool      { return isLowerAlnum(c) || c >= 'A' && c <= 'Z' }
