package main

import (
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseArgs(t *testing.T) {
	good := map[string]command{
		"pause":                   {name: "pause", count: 1},
		"serve tcp 8080 a":        {name: "serve", proto: "tcp", addr: ":8080", label: "a", count: 1},
		"serve udp 53 dns":        {name: "serve", proto: "udp", addr: ":53", label: "dns", count: 1},
		"dial tcp 10.0.0.1:80":    {name: "dial", proto: "tcp", addr: "10.0.0.1:80", count: 1},
		"dial udp [fd00::1]:53 5": {name: "dial", proto: "udp", addr: "[fd00::1]:53", count: 5},
		"hold tcp 10.96.0.20:80":  {name: "hold", proto: "tcp", addr: "10.96.0.20:80", count: 1},
		"hold udp 10.96.0.53:53":  {name: "hold", proto: "udp", addr: "10.96.0.53:53", count: 1},
	}
	for in, want := range good {
		got, err := parseArgs(strings.Fields(in))
		if err != nil || got != want {
			t.Errorf("parseArgs(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", "nope", "pause x", "serve tcp 8080", "serve sctp 8080 a", "serve tcp 0 a",
		"serve tcp 70000 a", "dial tcp", "dial tcp 10.0.0.1", "dial tcp 10.0.0.1:80 0",
		"dial tcp 10.0.0.1:80 x", "hold sctp 10.0.0.1:80", "hold tcp 10.0.0.1:80 2",
	} {
		if _, err := parseArgs(strings.Fields(in)); err == nil {
			t.Errorf("parseArgs(%q) accepted", in)
		}
	}
}

func TestErrnoName(t *testing.T) {
	cases := map[string]error{
		"ECONNREFUSED": &net.OpError{Op: "dial", Err: fmt.Errorf("connect: %w", syscall.ECONNREFUSED)},
		"ENETUNREACH":  syscall.ENETUNREACH,
		"ECONNABORTED": fmt.Errorf("read: %w", syscall.ECONNABORTED),
		"ETIMEDOUT":    &net.OpError{Op: "read", Err: timeoutErr{}},
		"EOF":          io.EOF,
		"EUNKNOWN":     fmt.Errorf("something else"),
	}
	for want, err := range cases {
		if got := errnoName(err); got != want {
			t.Errorf("errnoName(%v) = %s, want %s", err, got, want)
		}
	}
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

// The servers and the client talk over loopback here: no root needed, no packet leaves.
func TestServeAndDial(t *testing.T) {
	for _, proto := range []string{"tcp", "udp"} {
		t.Run(proto, func(t *testing.T) {
			srv, err := startServer(command{name: "serve", proto: proto, addr: "127.0.0.1:0", label: "b"})
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			var out strings.Builder
			if rc := dial(command{name: "dial", proto: proto, addr: srv.addr, count: 2}, &out); rc != 0 {
				t.Fatalf("dial exit %d: %s", rc, out.String())
			}
			want := strings.Repeat(fmt.Sprintf("reply=b peer=%s\n", srv.addr), 2)
			if out.String() != want {
				t.Fatalf("dial printed %q, want %q", out.String(), want)
			}
		})
	}
}

func TestTCPEcho(t *testing.T) {
	srv, err := startServer(command{name: "serve", proto: "tcp", addr: "127.0.0.1:0", label: "e"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	conn, err := net.DialTimeout("tcp", srv.addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	conn.Write([]byte("ping"))
	conn.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(conn)
	if err != nil || string(got) != "e\nping" {
		t.Fatalf("got %q, %v; want %q", got, err, "e\nping")
	}
}

func TestDialRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var out strings.Builder
	if rc := dial(command{name: "dial", proto: "tcp", addr: addr, count: 1}, &out); rc != 1 {
		t.Fatalf("dial exit %d, want 1", rc)
	}
	if !strings.HasPrefix(out.String(), "error=ECONNREFUSED ") || strings.Count(out.String(), "\n") != 1 {
		t.Fatalf("dial printed %q", out.String())
	}
}

func TestHoldReportsPeerClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("h\n"))
		c.Close()
	}()
	var out strings.Builder
	if rc := hold(command{name: "hold", proto: "tcp", addr: ln.Addr().String()}, &out); rc != 0 {
		t.Fatalf("hold exit %d: %s", rc, out.String())
	}
	want := fmt.Sprintf("connected peer=%s reply=h\nread-error=EOF\n", ln.Addr())
	if out.String() != want {
		t.Fatalf("hold printed %q, want %q", out.String(), want)
	}
}
