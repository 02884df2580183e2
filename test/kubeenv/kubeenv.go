// Package kubeenv runs a real, private Kubernetes API server for tests: etcd and
// kube-apiserver v1.37 (built by scripts/install-kube.sh into bin/), on 127.0.0.1 only, with
// RBAC on, and client certificates for an admin and for any user a test names.
//
// Nothing else of a cluster runs: no controller manager, scheduler or kubelet. Tests create
// Nodes, Services and EndpointSlices themselves, as the controllers would; with
// --endpoint-reconciler-type=none even default/kubernetes has no endpoints.
//
// Everything a Server creates lives in its directory (certificates, etcd's data, logs),
// and its Cleanup stops the two processes it started, by PID, even when the test fails;
// the logs are printed then.
package kubeenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/podsock/podsock/test/testenv"
)

// Options configures a Server. The zero value is a server in a t.TempDir() with the
// service range 10.96.0.0/16.
type Options struct {
	Dir         string       // certificates, etcd data and logs; "" = t.TempDir()
	ServiceCIDR netip.Prefix // --service-cluster-ip-range; default 10.96.0.0/16
	// APIServerArgs are added to (and, being last, override) the API server's flags.
	APIServerArgs []string
}

// Server is one etcd and one kube-apiserver, both on loopback, and the CA they trust.
type Server struct {
	URL             string       // https://127.0.0.1:PORT
	EtcdURL         string       // http://127.0.0.1:PORT
	Dir             string       // where everything below lives
	AdminKubeconfig string       // a kubeconfig for AdminUser, in system:masters
	ServiceCIDR     netip.Prefix // the service range the API server allocates from

	ca        *authority
	admin     keyPair
	etcd      *process
	apiserver *process
	// What the API server was started with, to start it again as it was.
	bin           string
	apiserverPort int
	apiserverArgs []string
	restartsMu    sync.Mutex
	restarts      []*process // the API servers StartAPIServer started
}

// AdminUser is the user of AdminKubeconfig and AdminConfig; it is in system:masters.
const AdminUser = "kubeenv-admin"

const (
	defaultServiceCIDR = "10.96.0.0/16"
	readyTimeout       = 2 * time.Minute // ~6 s measured cold; much more only if stuck
	stopTimeout        = 10 * time.Second
	startAttempts      = 3 // a port picked free can be taken before the process binds it
	logTailLines       = 60
)

// Binaries are the programs Require checks for in <repo>/bin.
var Binaries = []string{"etcd", "kube-apiserver", "kubectl"}

// Require skips a test that needs the real API server when its binaries are not built,
// and fails it instead when CI=true: there, `make deps` must have built them.
func Require(t testing.TB) {
	t.Helper()
	if _, err := binDir(); err != nil {
		testenv.SkipOrFail(t, "real API server: "+err.Error())
	}
}

func binDir() (string, error) {
	root, err := testenv.RepoRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, "bin")
	for _, b := range Binaries {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Errorf("bin/%s not built: run make deps (scripts/install-kube.sh)", b)
		}
	}
	return dir, nil
}

// Start runs etcd and kube-apiserver, waits until the API server is ready and its default
// namespace exists, and registers their stop (and, if the test failed, the printing of their
// logs) with t.Cleanup. Under `go test` it calls Require first; a program (the bench, with
// testenv.Standalone) fails instead when the binaries are missing.
func Start(t testenv.TB, opts Options) *Server {
	t.Helper()
	if tt, ok := t.(testing.TB); ok {
		Require(tt)
	}
	bin, err := binDir()
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	s := &Server{Dir: opts.Dir, ServiceCIDR: opts.ServiceCIDR, bin: bin, apiserverArgs: opts.APIServerArgs}
	if s.Dir == "" {
		s.Dir = tempDir(t)
	}
	if !s.ServiceCIDR.IsValid() {
		s.ServiceCIDR = netip.MustParsePrefix(defaultServiceCIDR)
	}
	if err := s.writeCredentials(); err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	t.Cleanup(func() {
		if f, ok := t.(failureLog); ok && f.Failed() {
			s.printLogs(f)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()

	s.etcd, err = startWithFreshPorts(t, func() (*process, error) { return s.startEtcd(ctx, bin) })
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	s.apiserver, err = startWithFreshPorts(t, func() (*process, error) {
		ports, err := freePorts(1)
		if err != nil {
			return nil, err
		}
		s.apiserverPort = ports[0]
		return s.startAPIServer(ctx)
	})
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	// With the Server, not with the (sub)test that restarted them: its clients may
	// still be watching then.
	t.Cleanup(func() {
		s.restartsMu.Lock()
		defer s.restartsMu.Unlock()
		for _, p := range s.restarts {
			if err := p.stop(); err != nil {
				t.Errorf("kubeenv: %v", err)
			}
		}
	})
	if err := s.writeKubeconfig(s.AdminKubeconfig, AdminUser, s.admin); err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	if err := s.waitDefaultNamespace(ctx); err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	return s
}

// tempDir is t.TempDir() under `go test`, and otherwise a directory removed at cleanup
// (registered first, so it goes after the processes that write into it).
func tempDir(t testenv.TB) string {
	if tt, ok := t.(testing.TB); ok {
		return tt.TempDir()
	}
	dir, err := os.MkdirTemp("", "kubeenv-")
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("kubeenv: %v", err)
		}
	})
	return dir
}

// failureLog is the part of testing.TB that reports a failure with the logs; a program's
// TB may not have it, and then the logs stay in Server.Dir until its cleanup.
type failureLog interface {
	Failed() bool
	Logf(format string, args ...any)
}

// startWithFreshPorts starts a process on newly picked ports, again when it lost a port to
// someone else, and registers its stop. Every process it started is stopped by its PID.
func startWithFreshPorts(t testenv.TB, start func() (*process, error)) (*process, error) {
	var err error
	for range startAttempts {
		var p *process
		p, err = start()
		if p != nil {
			t.Cleanup(func() {
				if err := p.stop(); err != nil {
					t.Errorf("kubeenv: %v", err)
				}
			})
		}
		if err == nil {
			return p, nil
		}
		if p == nil || !p.logContains("address already in use") {
			return nil, err
		}
	}
	return nil, err
}

func (s *Server) writeCredentials() error {
	var err error
	if s.ca, err = newAuthority(); err != nil {
		return err
	}
	serving, err := s.ca.serving()
	if err != nil {
		return err
	}
	if s.admin, err = s.ca.client(AdminUser, []string{"system:masters"}); err != nil {
		return err
	}
	saKey, err := serviceAccountKey()
	if err != nil {
		return err
	}
	s.AdminKubeconfig = filepath.Join(s.Dir, "admin.kubeconfig")
	for _, d := range []string{"pki", "etcd", "apiserver-certs", "users"} {
		if err := os.MkdirAll(filepath.Join(s.Dir, d), 0o700); err != nil {
			return err
		}
	}
	for name, data := range map[string][]byte{
		"ca.crt":     s.ca.certPEM,
		"server.crt": serving.cert,
		"server.key": serving.key,
		"sa.key":     saKey,
	} {
		if err := os.WriteFile(s.pki(name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

func (s *Server) pki(name string) string { return filepath.Join(s.Dir, "pki", name) }

func (s *Server) startEtcd(ctx context.Context, bin string) (*process, error) {
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	client := "http://" + loopback(ports[0])
	peer := "http://" + loopback(ports[1])
	p, err := startProcess("etcd", filepath.Join(bin, "etcd"), filepath.Join(s.Dir, "etcd.log"),
		"--name=kubeenv",
		"--data-dir="+filepath.Join(s.Dir, "etcd"),
		"--listen-client-urls="+client, "--advertise-client-urls="+client,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer,
		"--initial-cluster=kubeenv="+peer,
		"--unsafe-no-fsync", // a test's data is thrown away
	)
	if err != nil {
		return nil, err
	}
	s.EtcdURL = client
	return p, p.waitReady(ctx, func(ctx context.Context) error {
		return HTTPOK(ctx, http.DefaultClient, client+"/health")
	})
}

func (s *Server) startAPIServer(ctx context.Context) (*process, error) {
	args := []string{
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(s.apiserverPort),
		"--etcd-servers=" + s.EtcdURL,
		"--service-cluster-ip-range=" + s.ServiceCIDR.String(),
		"--authorization-mode=RBAC",
		"--client-ca-file=" + s.pki("ca.crt"),
		"--tls-cert-file=" + s.pki("server.crt"),
		"--tls-private-key-file=" + s.pki("server.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + s.pki("sa.key"),
		"--service-account-signing-key-file=" + s.pki("sa.key"),
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--disable-admission-plugins=ServiceAccount",
		"--cert-dir=" + filepath.Join(s.Dir, "apiserver-certs"), // else /var/run/kubernetes
		"--profiling=false",
	}
	p, err := startProcess("kube-apiserver", filepath.Join(s.bin, "kube-apiserver"),
		filepath.Join(s.Dir, "kube-apiserver.log"), append(args, s.apiserverArgs...)...)
	if err != nil {
		return nil, err
	}
	s.URL = "https://" + loopback(s.apiserverPort)
	client, err := rest.HTTPClientFor(s.AdminConfig())
	if err != nil {
		return p, err
	}
	return p, p.waitReady(ctx, func(ctx context.Context) error {
		return HTTPOK(ctx, client, s.URL+"/readyz")
	})
}

// waitDefaultNamespace waits for the namespace the API server creates after it is ready,
// so a test can create objects in "default" at once.
func (s *Server) waitDefaultNamespace(ctx context.Context) error {
	c, err := kubernetes.NewForConfig(s.AdminConfig())
	if err != nil {
		return err
	}
	for {
		_, err := c.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{})
		if err == nil {
			return nil
		}
		if !apierrors.IsNotFound(err) {
			return fmt.Errorf("namespace %s: %w", metav1.NamespaceDefault, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("namespace %s never created: %w", metav1.NamespaceDefault, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// StopAPIServer kills kube-apiserver (SIGKILL, by its PID) and leaves etcd running, so
// that a test sees what its clients do while the API server is away: as abrupt as a
// crash, and at once (with watches open, its graceful stop takes longer than stopTimeout).
// StartAPIServer brings it back.
func (s *Server) StopAPIServer(t testenv.TB) {
	t.Helper()
	if err := s.apiserver.kill(); err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
}

// StartAPIServer starts kube-apiserver again after StopAPIServer, on the same address,
// with the same flags and certificates, so kubeconfigs written before work again, and
// waits until it is ready. It is stopped with the Server.
func (s *Server) StartAPIServer(t testenv.TB) {
	t.Helper()
	select {
	case <-s.apiserver.exited:
	default:
		t.Fatalf("kubeenv: kube-apiserver (pid %d) still runs: StopAPIServer first", s.apiserver.pid())
	}
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	p, err := s.startAPIServer(ctx)
	if p != nil {
		s.apiserver = p
		s.restartsMu.Lock()
		s.restarts = append(s.restarts, p)
		s.restartsMu.Unlock()
	}
	if err != nil {
		// The port was free a moment ago; someone may have taken it since.
		t.Fatalf("kubeenv: start kube-apiserver again on port %d: %v", s.apiserverPort, err)
	}
}

// AdminConfig is a fresh client config for AdminUser (system:masters).
func (s *Server) AdminConfig() *rest.Config {
	return s.restConfig(s.admin)
}

// AdminClient is a clientset for AdminUser.
func (s *Server) AdminClient(t testenv.TB) *kubernetes.Clientset {
	t.Helper()
	return clientset(t, s.AdminConfig())
}

// UserConfig mints a client certificate for user (CN=user, O=groups) and returns a client
// config that authenticates with it. The user can do only what RBAC grants it.
func (s *Server) UserConfig(t testenv.TB, user string, groups ...string) *rest.Config {
	t.Helper()
	kp, err := s.ca.client(user, groups)
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	return s.restConfig(kp)
}

// UserClient is a clientset for UserConfig(user, groups...).
func (s *Server) UserClient(t testenv.TB, user string, groups ...string) *kubernetes.Clientset {
	t.Helper()
	return clientset(t, s.UserConfig(t, user, groups...))
}

// UserKubeconfig writes a kubeconfig for user (CN=user, O=groups), with its certificate
// and key inline, and returns its path: what a program under test is given.
func (s *Server) UserKubeconfig(t testenv.TB, user string, groups ...string) string {
	t.Helper()
	kp, err := s.ca.client(user, groups)
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	path := filepath.Join(s.Dir, "users", strings.ReplaceAll(user, ":", "_")+".kubeconfig")
	if err := s.writeKubeconfig(path, user, kp); err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	return path
}

// Pids are the processes the Server runs, by name ("etcd", "kube-apiserver").
func (s *Server) Pids() map[string]int {
	return map[string]int{s.etcd.name: s.etcd.pid(), s.apiserver.name: s.apiserver.pid()}
}

func (s *Server) restConfig(kp keyPair) *rest.Config {
	return &rest.Config{
		Host: s.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData: s.ca.certPEM, CertData: kp.cert, KeyData: kp.key,
		},
		// Tests create objects in bulk; client-go's default of 5/s would pace them.
		QPS: 200, Burst: 400,
	}
}

func (s *Server) writeKubeconfig(path, user string, kp keyPair) error {
	const name = "kubeenv"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = &clientcmdapi.Cluster{Server: s.URL, CertificateAuthorityData: s.ca.certPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: kp.cert, ClientKeyData: kp.key}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: user}
	cfg.CurrentContext = name
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return nil
}

func (s *Server) printLogs(t failureLog) {
	for _, p := range []*process{s.apiserver, s.etcd} {
		if p != nil {
			t.Logf("kubeenv: last lines of %s:\n%s", p.logPath, p.logTail(logTailLines))
		}
	}
}

func clientset(t testenv.TB, cfg *rest.Config) *kubernetes.Clientset {
	t.Helper()
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("kubeenv: client: %v", err)
	}
	return c
}

// HTTPOK is nil once url answers 200.
func HTTPOK(ctx context.Context, client *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}

// freePorts picks n distinct loopback ports that are free now.
func freePorts(n int) ([]int, error) {
	var ports []int
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		held = append(held, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// process is one program the Server started, logging to its own file.
type process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{} // closed once Wait returned; err is set then
	err     error
}

func startProcess(name, path, logPath string, args ...string) (*process, error) {
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer log.Close() // the child has its own copy
	fmt.Fprintf(log, "kubeenv: %s %s\n", path, strings.Join(args, " "))
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = log, log
	// Killed with the test binary if it dies before its cleanup runs (strictly: when the
	// thread that started it ends, so never start one from a goroutine that exits locked
	// to its thread).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, logPath: logPath, cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// waitReady polls ready until it succeeds, the process exits or ctx ends.
func (p *process) waitReady(ctx context.Context, ready func(context.Context) error) error {
	for {
		err := ready(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before it was ready (%w); see %s", p.name, p.err, p.logPath)
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last: %w); see %s", p.name, ctx.Err(), err, p.logPath)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stop ends the process by its PID: SIGTERM, then SIGKILL after stopTimeout.
func (p *process) stop() error {
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stop %s: %w", p.name, err)
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(stopTimeout):
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s: %w", p.name, err)
	}
	<-p.exited
	return fmt.Errorf("stop %s: pid %d ignored SIGTERM for %v; killed", p.name, p.pid(), stopTimeout)
}

// kill ends the process by its PID with SIGKILL and waits for it.
func (p *process) kill() error {
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s: %w", p.name, err)
	}
	<-p.exited
	return nil
}

func (p *process) logContains(s string) bool {
	b, err := os.ReadFile(p.logPath)
	return err == nil && strings.Contains(string(b), s)
}

func (p *process) logTail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
