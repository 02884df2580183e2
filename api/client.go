package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// SocketName is the control socket's file name inside state_dir.
const SocketName = "podsock.sock"

// ErrNotRunning says no agent answers on the control socket.
var ErrNotRunning = errors.New("agent is not running")

// Client talks to a running agent over its control socket.
type Client struct {
	path string
	http *http.Client
}

// NewClient returns a client for the agent whose state_dir is given.
func NewClient(stateDir string) *Client {
	path := filepath.Join(stateDir, SocketName)
	return &Client{path: path, http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}}
}

func (c *Client) get(path string, v any) error {
	return c.stream(path, func(dec *json.Decoder) error { return dec.Decode(v) })
}

// stream sends a GET and hands the answer's body to read.
func (c *Client) stream(path string, read func(*json.Decoder) error) error {
	req, err := http.NewRequest(http.MethodGet, "http://podsock"+path, nil)
	if err != nil {
		return fmt.Errorf("request %s: %w", path, err)
	}
	return c.do(c.http, req, read)
}

// do sends req with hc and hands the answer's body to read.
func (c *Client) do(hc *http.Client, req *http.Request, read func(*json.Decoder) error) error {
	resp, err := hc.Do(req)
	if err != nil {
		switch {
		case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ECONNREFUSED):
			return fmt.Errorf("%w (no answer on %s)", ErrNotRunning, c.path)
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			return fmt.Errorf("permission denied on %s (the control socket is root's)", c.path)
		}
		return fmt.Errorf("control socket %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var msg [512]byte
		n, _ := resp.Body.Read(msg[:])
		return fmt.Errorf("agent: %s: %s", resp.Status, bytes.TrimSpace(msg[:n]))
	}
	return read(json.NewDecoder(resp.Body))
}

// Status asks the agent for its status.
func (c *Client) Status() (Status, error) {
	var st Status
	return st, c.get("/v1/status", &st)
}

// Pods asks the agent for the pods it knows from the runtime.
func (c *Client) Pods() ([]PodView, error) {
	var out []PodView
	return out, c.get("/v1/pods", &out)
}

// Sockets asks the agent for the sockets matching q and hands them to fn as they arrive.
func (c *Client) Sockets(q SocketQuery, fn func(SocketView) error) error {
	v := url.Values{}
	for k, s := range map[string]string{"pod": q.Pod, "backend": q.Backend, "proto": q.Proto} {
		if s != "" {
			v.Set(k, s)
		}
	}
	path := "/v1/sockets"
	if len(v) > 0 {
		path += "?" + v.Encode()
	}
	return c.stream(path, func(dec *json.Decoder) error {
		if _, err := dec.Token(); err != nil {
			return fmt.Errorf("read sockets: %w", err)
		}
		for dec.More() {
			var s SocketView
			if err := dec.Decode(&s); err != nil {
				return fmt.Errorf("read sockets (the agent may have cut the list short): %w", err)
			}
			if err := fn(s); err != nil {
				return err
			}
		}
		if _, err := dec.Token(); err != nil {
			return fmt.Errorf("read sockets (the agent cut the list short): %w", err)
		}
		return nil
	})
}

// Services asks the agent for the services as the datapath has them.
func (c *Client) Services() ([]ServiceView, error) {
	var out []ServiceView
	return out, c.get("/v1/services", &out)
}

// Trace streams the decisions q asks for to fn, and each new count of lost decisions to
// lost, until ctx ends (which returns nil) or the agent stops.
func (c *Client) Trace(ctx context.Context, q TraceQuery, fn func(TraceView) error, lost func(uint64)) error {
	v := url.Values{}
	if q.Pod != "" {
		v.Set("pod", q.Pod)
	}
	if q.Service != "" {
		v.Set("service", q.Service)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://podsock/v1/trace?"+v.Encode(), nil)
	if err != nil {
		return fmt.Errorf("trace request: %w", err)
	}
	// A stream has no deadline: it lasts until ctx ends.
	streaming := &http.Client{Transport: c.http.Transport}
	err = c.do(streaming, req, func(dec *json.Decoder) error {
		for {
			var l TraceLine
			if err := dec.Decode(&l); err != nil {
				return fmt.Errorf("read trace: %w", err)
			}
			if l.Lost != nil {
				lost(*l.Lost)
				continue
			}
			if err := fn(l.TraceView); err != nil {
				return err
			}
		}
	})
	if errors.Is(err, context.Canceled) || ctx.Err() != nil {
		// Interrupted: the stream ended as asked.
		return nil //nolint:nilerr // the caller's own cancellation is no failure
	}
	return err
}
