package kubesource

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The informers' caches hold every Service and EndpointSlice of the cluster for as long
// as the agent runs, and most of what the API server sends of them (annotations such as
// last-applied-configuration, owner references, target refs, app protocols, health check
// ports, ...) is never read here: at 10,000 Services of 10 endpoints, the whole objects
// were most of the agent's heap. The slim forms keep only what Translate, the event
// handlers and the index read; a field they come to read must be kept here too
// (TestSlimKeepsWhatTranslateReads says whether the translation is still the same).

// slimMeta keeps the identity and version of an object (the handlers compare versions)
// and the labels and annotations named.
func slimMeta(m *metav1.ObjectMeta, labels, annotations []string) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name: m.Name, Namespace: m.Namespace, UID: m.UID, ResourceVersion: m.ResourceVersion,
		Labels: pick(m.Labels, labels), Annotations: pick(m.Annotations, annotations),
	}
}

func pick(m map[string]string, keys []string) map[string]string {
	var out map[string]string
	for _, k := range keys {
		if v, ok := m[k]; ok {
			if out == nil {
				out = make(map[string]string, len(keys))
			}
			out[k] = v
		}
	}
	return out
}

// serviceLabels are those the Services selector reads: Translate checks it again.
var serviceLabels = []string{corev1.IsHeadlessService, LabelServiceProxyName}

func slimService(svc *corev1.Service) *corev1.Service {
	out := &corev1.Service{ObjectMeta: slimMeta(&svc.ObjectMeta, serviceLabels, nil)}
	sp := &svc.Spec
	out.Spec = corev1.ServiceSpec{
		Type: sp.Type, ClusterIP: sp.ClusterIP, ClusterIPs: sp.ClusterIPs, ExternalIPs: sp.ExternalIPs,
		SessionAffinity: sp.SessionAffinity, SessionAffinityConfig: sp.SessionAffinityConfig,
		InternalTrafficPolicy: sp.InternalTrafficPolicy, ExternalTrafficPolicy: sp.ExternalTrafficPolicy,
		TrafficDistribution: sp.TrafficDistribution,
	}
	if len(sp.Ports) > 0 {
		out.Spec.Ports = make([]corev1.ServicePort, len(sp.Ports))
		for i, p := range sp.Ports {
			out.Spec.Ports[i] = corev1.ServicePort{Name: p.Name, Protocol: p.Protocol, Port: p.Port, NodePort: p.NodePort}
		}
	}
	if ing := svc.Status.LoadBalancer.Ingress; len(ing) > 0 {
		out.Status.LoadBalancer.Ingress = make([]corev1.LoadBalancerIngress, len(ing))
		for i, in := range ing {
			out.Status.LoadBalancer.Ingress[i] = corev1.LoadBalancerIngress{IP: in.IP, IPMode: in.IPMode}
		}
	}
	return out
}

var (
	sliceLabels      = []string{discoveryv1.LabelServiceName, corev1.IsHeadlessService, LabelServiceProxyName}
	sliceAnnotations = []string{corev1.EndpointsLastChangeTriggerTime}
)

func slimSlice(slice *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	out := &discoveryv1.EndpointSlice{
		ObjectMeta:  slimMeta(&slice.ObjectMeta, sliceLabels, sliceAnnotations),
		AddressType: slice.AddressType,
		Ports:       make([]discoveryv1.EndpointPort, len(slice.Ports)),
	}
	for i, p := range slice.Ports {
		out.Ports[i] = discoveryv1.EndpointPort{Name: p.Name, Protocol: p.Protocol, Port: p.Port}
	}
	if len(slice.Endpoints) > 0 {
		out.Endpoints = make([]discoveryv1.Endpoint, len(slice.Endpoints))
	}
	for i, ep := range slice.Endpoints {
		e := discoveryv1.Endpoint{NodeName: ep.NodeName, Zone: ep.Zone, Hints: ep.Hints}
		if len(ep.Addresses) > 0 {
			// Only the first address counts (endpointsOf).
			e.Addresses = ep.Addresses[:1:1]
		}
		e.Conditions = discoveryv1.EndpointConditions{
			Ready: shared(ep.Conditions.Ready), Serving: shared(ep.Conditions.Serving), Terminating: shared(ep.Conditions.Terminating),
		}
		out.Endpoints[i] = e
	}
	return out
}

var yes, no = true, false

// shared points conditions at one true and one false: a slice of 10 endpoints has 30.
// Nothing writes through them.
func shared(b *bool) *bool {
	switch {
	case b == nil:
		return nil
	case *b:
		return &yes
	}
	return &no
}

// slim is the informers' transform: Services and EndpointSlices in their slim forms,
// anything else (the Node) without its managed fields.
func slim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Service:
		return slimService(o), nil
	case *discoveryv1.EndpointSlice:
		return slimSlice(o), nil
	}
	return dropManagedFields(obj)
}
