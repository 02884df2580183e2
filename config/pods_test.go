package config

import (
	"strings"
	"testing"

	"github.com/podsock/podsock/service"
)

type lbls = map[string]string

func TestSelectorMatches(t *testing.T) {
	pod := lbls{"app": "web", "tier": "front", "empty": ""}
	for _, tt := range []struct {
		name string
		sel  service.Selector
		ns   string
		lbls lbls
		want bool
	}{
		{"namespace only", service.Selector{Namespace: "default"}, "default", pod, true},
		{"namespace only, other namespace", service.Selector{Namespace: "default"}, "kube-system", pod, false},
		{"namespace is exact", service.Selector{Namespace: "default"}, "Default", pod, false},
		{"labels only, any namespace", service.Selector{Labels: lbls{"app": "web"}}, "anything", pod, true},
		{"all labels must match", service.Selector{Labels: lbls{"app": "web", "tier": "front"}}, "x", pod, true},
		{"one label differs", service.Selector{Labels: lbls{"app": "web", "tier": "back"}}, "x", pod, false},
		{"label missing", service.Selector{Labels: lbls{"app": "web", "role": "client"}}, "x", pod, false},
		{"empty value needs the label", service.Selector{Labels: lbls{"empty": ""}}, "x", pod, true},
		{"empty value, label absent", service.Selector{Labels: lbls{"role": ""}}, "x", pod, false},
		{"label values are exact", service.Selector{Labels: lbls{"app": "Web"}}, "x", pod, false},
		{"pod without labels", service.Selector{Labels: lbls{"app": "web"}}, "x", nil, false},
		{"namespace and labels", service.Selector{Namespace: "default", Labels: lbls{"app": "web"}}, "default", pod, true},
		{"namespace and labels, other namespace", service.Selector{Namespace: "default", Labels: lbls{"app": "web"}}, "prod", pod, false},
		{"empty labels is any", service.Selector{Namespace: "default", Labels: lbls{}}, "default", nil, true},
		{"zero selector matches all", service.Selector{}, "x", nil, true},
	} {
		if got := tt.sel.Matches(tt.ns, tt.lbls); got != tt.want {
			t.Errorf("%s: %+v.Matches(%q, %v) = %v, want %v", tt.name, tt.sel, tt.ns, tt.lbls, got, tt.want)
		}
	}
}

func TestSkipsLB(t *testing.T) {
	lb := LB{SkipAnnotation: true, Skip: []service.Selector{
		{Namespace: "istio-system"},
		{Namespace: "default", Labels: lbls{"app": "istio-ingress"}},
	}}
	ignoring := lb
	ignoring.SkipAnnotation = false
	on := LB{SkipAnnotation: true}
	for _, tt := range []struct {
		name  string
		lb    LB
		ns    string
		lbls  lbls
		annot lbls
		want  bool
	}{
		{"first selector", lb, "istio-system", nil, nil, true},
		{"second selector", lb, "default", lbls{"app": "istio-ingress", "x": "y"}, nil, true},
		{"no selector matches", lb, "default", lbls{"app": "web"}, nil, false},
		{"annotation true", lb, "default", nil, lbls{SkipLBAnnotation: "true"}, true},
		{"annotation without selectors", on, "default", nil, lbls{"podsock.io/skip-lb": "true"}, true},
		{"annotation false", on, "default", nil, lbls{SkipLBAnnotation: "false"}, false},
		{"annotation True is not a skip", on, "default", nil, lbls{SkipLBAnnotation: "True"}, false},
		{"annotation 1 is not a skip", on, "default", nil, lbls{SkipLBAnnotation: "1"}, false},
		{"annotation with space is not a skip", on, "default", nil, lbls{SkipLBAnnotation: " true"}, false},
		{"annotation false does not override a selector", lb, "istio-system", nil, lbls{SkipLBAnnotation: "false"}, true},
		{"label with the annotation's name is not a skip", on, "default", lbls{SkipLBAnnotation: "true"}, nil, false},
		{"other annotation", on, "default", nil, lbls{"podsock.io/skip": "true"}, false},
		{"no skip at all", on, "default", lbls{"app": "web"}, lbls{}, false},
		{"hostns_only is separate", LB{HostnsOnly: true}, "default", nil, nil, false},
		{"annotation ignored with skip_annotation = false", ignoring, "default", nil, lbls{SkipLBAnnotation: "true"}, false},
		{"selectors still count with skip_annotation = false", ignoring, "istio-system", nil, nil, true},
		{"default config honours the annotation", Default().LB, "default", nil, lbls{SkipLBAnnotation: "true"}, true},
	} {
		if got := tt.lb.SkipsLB(tt.ns, tt.lbls, tt.annot); got != tt.want {
			t.Errorf("%s: SkipsLB(%q, %v, %v) = %v, want %v", tt.name, tt.ns, tt.lbls, tt.annot, got, tt.want)
		}
	}
}

func TestAllowsClients(t *testing.T) {
	allow := []service.Selector{{Namespace: "default", Labels: lbls{"role": "client"}}, {Namespace: "monitoring"}}
	for _, tt := range []struct {
		name      string
		svc       service.Service
		ns        string
		lbls      lbls
		restricts bool
		pod, host bool
	}{
		{"decoded default", service.Service{AllowHost: true}, "any", nil, false, true, true},
		{"zero value is open", service.Service{}, "any", nil, false, true, true},
		{"allow, first selector", service.Service{Allow: allow, AllowHost: true}, "default", lbls{"role": "client"}, true, true, true},
		{"allow, second selector", service.Service{Allow: allow, AllowHost: true}, "monitoring", nil, true, true, true},
		{"allow, no selector matches", service.Service{Allow: allow, AllowHost: true}, "default", lbls{"role": "server"}, true, false, true},
		{"allow, other namespace", service.Service{Allow: allow, AllowHost: true}, "prod", lbls{"role": "client"}, true, false, true},
		{"allow without the host", service.Service{Allow: allow}, "monitoring", nil, true, true, false},
		{"allow without the host, pod refused", service.Service{Allow: allow}, "prod", nil, true, false, false},
	} {
		s := tt.svc
		if got := s.RestrictsClients(); got != tt.restricts {
			t.Errorf("%s: RestrictsClients() = %v, want %v", tt.name, got, tt.restricts)
		}
		if got := s.AllowsPod(tt.ns, tt.lbls); got != tt.pod {
			t.Errorf("%s: AllowsPod(%q, %v) = %v, want %v", tt.name, tt.ns, tt.lbls, got, tt.pod)
		}
		if got := s.AllowsHost(); got != tt.host {
			t.Errorf("%s: AllowsHost() = %v, want %v", tt.name, got, tt.host)
		}
	}
}

func TestKubernetesNames(t *testing.T) {
	long := func(n int, c string) string { return strings.Repeat(c, n) }
	for _, tt := range []struct {
		key  string
		want string // "" when valid, else part of the message
	}{
		{"app", ""},
		{"A", ""},
		{"app.kubernetes.io/name", ""},
		{"sidecar.istio.io/inject", ""},
		{"example.com/Some_Name.v-2", ""},
		{"k8s.io/" + long(63, "n"), ""},
		{long(253, "p") + "/" + long(63, "n"), ""},
		{long(63, "k"), ""},
		{"a-b_c.d", ""},
		{"", "must be 1 to 63"},
		{long(64, "k"), "must be 1 to 63"},
		{"-app", "must be 1 to 63"},
		{"app_", "must be 1 to 63"},
		{"ap p", "must be 1 to 63"},
		{"äpp", "must be 1 to 63"},
		{"/app", `prefix ""`},
		{"Example.com/app", `prefix "Example.com"`},
		{"example..com/app", `prefix "example..com"`},
		{"-example.com/app", `prefix "-example.com"`},
		{"example_com/app", `prefix "example_com"`},
		{long(254, "p") + "/app", "must be a DNS subdomain"},
		{"example.com/", `name ""`},
		{"example.com/a/b", `name "a/b"`},
		{"example.com/" + long(64, "n"), "after the prefix must be 1 to 63"},
	} {
		got := checkLabelKey(tt.key)
		if tt.want == "" && got != "" || tt.want != "" && !strings.Contains(got, tt.want) {
			t.Errorf("checkLabelKey(%q) = %q, want %q", tt.key, got, tt.want)
		}
	}

	for _, tt := range []struct {
		s           string
		ns, lblName bool
	}{
		{"default", true, true},
		{"kube-system", true, true},
		{"a", true, true},
		{"0", true, true},
		{long(63, "a"), true, true},
		{long(64, "a"), false, false},
		{"", false, false},
		{"Default", false, true},
		{"a.b", false, true},
		{"a_b", false, true},
		{"-a", false, false},
		{"a-", false, false},
		{"a b", false, false},
		{"ü", false, false},
	} {
		if got := isDNSLabel(tt.s); got != tt.ns {
			t.Errorf("isDNSLabel(%q) = %v, want %v", tt.s, got, tt.ns)
		}
		if got := isLabelName(tt.s); got != tt.lblName {
			t.Errorf("isLabelName(%q) = %v, want %v", tt.s, got, tt.lblName)
		}
	}
}
