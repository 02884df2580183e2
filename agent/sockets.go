package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/podsock/podsock/api"
	"github.com/podsock/podsock/datapath"
	"github.com/podsock/podsock/internal/netns"
	"github.com/podsock/podsock/runtimehooks"
)

// nodeNetns is every netns the agent holds a handle to: the host's, and each pod's from
// RunPodSandbox to RemovePodSandbox. It is the datapath's way into them.
type nodeNetns struct {
	host    *netns.Handle
	tracker *runtimehooks.Tracker
}

// hostNetnsPath names the agent's own netns: the host's, for a node agent. The main thread
// never leaves it (cmd/podsock locks it), so /proc/self is safe here.
const hostNetnsPath = "/proc/self/ns/net"

func (n nodeNetns) Cookies() []uint64 {
	out := []uint64{n.host.Cookie()}
	for _, c := range n.tracker.NetnsCookies() {
		if c != n.host.Cookie() {
			out = append(out, c)
		}
	}
	return out
}

func (n nodeNetns) Enter(cookie uint64, f func() error) error {
	if cookie == n.host.Cookie() {
		return netns.Do(n.host.Fd(), f)
	}
	err := n.tracker.WithNetnsCookie(cookie, func(fd int) error { return netns.Do(fd, f) })
	if errors.Is(err, runtimehooks.ErrNoNetns) {
		return fmt.Errorf("%w: %w", datapath.ErrUnknownNetns, err)
	}
	return err
}

// socketFilter turns a query into the datapath's filter, given the pods the runtime
// reported; its errors are the user's (HTTP 400), and name the bad value.
func (a *Agent) socketFilter(q api.SocketQuery, pods []runtimehooks.Pod) (datapath.SocketFilter, error) {
	p, err := q.Parse()
	if err != nil {
		return datapath.SocketFilter{}, err
	}
	f := datapath.SocketFilter{Proto: protoNumber(p.Proto), Backend: p.Backend}
	if p.Pod == "" {
		return f, nil
	}
	for _, pod := range pods {
		if pod.Namespace+"/"+pod.Name != p.Pod {
			continue
		}
		cookie := pod.NetnsCookie
		if pod.HostNetwork {
			cookie = a.netns.host.Cookie()
		} else if cookie == 0 {
			return f, fmt.Errorf("--pod %q: podsock holds no netns of that pod", p.Pod)
		}
		if !slices.Contains(f.Netns, cookie) {
			f.Netns = append(f.Netns, cookie)
		}
	}
	if f.Netns == nil {
		return f, fmt.Errorf("--pod %q: no such pod (want NAMESPACE/NAME, as `podsock pods` shows)", p.Pod)
	}
	return f, nil
}

// protoNumber is the datapath's number for a protocol's name; 0 (both) for "".
func protoNumber(name string) uint8 {
	switch name {
	case "tcp":
		return datapath.ProtoTCP
	case "udp":
		return datapath.ProtoUDP
	}
	return 0
}

// serveSockets streams the sockets as a JSON array, one element at a time, so the agent
// never holds the whole list however many sockets the node has.
func (a *Agent) serveSockets(w http.ResponseWriter, r *http.Request) {
	q := api.SocketQuery{Pod: r.URL.Query().Get("pod"), Backend: r.URL.Query().Get("backend"), Proto: r.URL.Query().Get("proto")}
	pods := a.tracker.Pods()
	f, err := a.socketFilter(q, pods)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if err := a.dp.ListErr(f.Proto); err != nil {
		http.Error(w, err.Error(), http.StatusNotImplemented)
		return
	}
	podOf := map[uint64]string{}
	for _, p := range pods {
		if p.NetnsCookie != 0 && !p.HostNetwork {
			podOf[p.NetnsCookie] = p.Namespace + "/" + p.Name
		}
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	rc := http.NewResponseController(w)
	first := true
	st, err := a.dp.Sockets(a.netns, f, func(s datapath.Socket) error {
		// A client that stops reading must not hold the listing (and its lock) forever.
		if err := rc.SetWriteDeadline(time.Now().Add(listWriteTimeout)); err != nil {
			return err
		}
		sep := ","
		if first {
			sep, first = "[", false
		}
		if _, err := w.Write([]byte(sep)); err != nil {
			return err
		}
		return enc.Encode(socketView(s, podOf[s.NetnsCookie]))
	})
	if st.NetnsSkipped > 0 {
		a.log.Infof("list sockets: %d netns went away during the walk and were skipped", st.NetnsSkipped)
	}
	if err != nil {
		a.log.WithError(err).Warn("list sockets")
		if first {
			http.Error(w, "list sockets: "+err.Error(), http.StatusInternalServerError)
			return
		}
		// The status line is gone already: a cut connection is how the client learns.
		panic(http.ErrAbortHandler)
	}
	if first {
		_, _ = w.Write([]byte("["))
	}
	_, _ = w.Write([]byte("]\n"))
}

// listWriteTimeout bounds how long one element of a listing may wait on the client.
const listWriteTimeout = 30 * time.Second

func socketView(s datapath.Socket, pod string) api.SocketView {
	v := api.SocketView{
		Proto: datapath.ProtoName(s.Proto), State: datapath.StateName(s.Proto, s.State),
		Local: s.Local.String(), NetnsCookie: s.NetnsCookie, SocketCookie: s.Cookie, Pod: pod, UID: s.UID,
	}
	if s.Remote.IsValid() {
		v.Remote = s.Remote.String()
	}
	if s.Balanced {
		v.Service = s.Service
		v.Backend = s.Backend.String()
		v.VIP = s.VIP.String()
	}
	return v
}
