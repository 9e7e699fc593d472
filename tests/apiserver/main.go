// Command kiln-test-apiserver runs a real kube-apiserver (Kubernetes 1.34,
// linked in from k8s.io/kubernetes) backed by an embedded etcd, both on
// loopback, for kiln's integration tests. It is test-only code.
//
// Usage:
//
//	kiln-test-apiserver --dir DIR [--port N] [-- extra kube-apiserver flags...]
//	kiln-test-apiserver kubelet|kube-scheduler|kube-controller-manager|cri-clean ...
//
// The second form runs the node components of the test cluster (node.go).
//
// Layout under DIR (created if missing):
//
//	pki/         CA, serving cert, admin client cert, service-account key pair,
//	             static token file (reused across restarts if complete)
//	etcd/        etcd data (wiped on every start: each run is a fresh cluster)
//	etcd.log     etcd's own log (warnings and errors only)
//	kubeconfig   admin kubeconfig, written only once /readyz is ok
//	ready        written last; contains the server URL
//
// The process runs until SIGTERM or SIGINT, then shuts the apiserver and etcd
// down cleanly and removes DIR/ready.
//
// What the cluster is, and is not:
//
//   - Authorization is Node,RBAC (never AlwaysAllow). The admin kubeconfig
//     authenticates with a client certificate in group system:masters
//     (context "kiln-test", the current one); context "kiln-test-token" does
//     the same with a static bearer token (also in DIR/pki/admin.token).
//   - ServiceAccount tokens work: the TokenRequest API (`kubectl create token`)
//     is served, tokens are signed with a generated RSA key, the issuer is
//     https://kubernetes.default.svc.cluster.local and the audience defaults to
//     the issuer.
//   - There is no kube-controller-manager, scheduler or kubelet. A few of
//     kube-controller-manager's controllers run in this process instead (see
//     controllers.go; --controllers=false turns them off): clusterrole
//     aggregation, namespace finalization, the "default" ServiceAccount, and
//     the garbage collector. Nothing else: Deployments/Jobs never produce Pods,
//     no Pod ever runs, no kube-root-ca.crt ConfigMap is published. Without
//     --controllers, deleted namespaces stay Terminating forever, owned objects
//     are never garbage collected and the aggregated ClusterRoles admin, edit
//     and view are empty.
//   - The built-in "kubernetes" Service exists but has no Endpoints
//     (--endpoint-reconciler-type=none; a loopback address is not a valid
//     endpoint).
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/embed"

	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // as in cmd/kube-apiserver
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

const (
	serviceCIDR = "10.0.0.0/24"
	saIssuer    = "https://kubernetes.default.svc.cluster.local"
	clusterName = "kiln-test"
)

func main() {
	subcommand() // kubelet, kube-scheduler, ... (node.go): runs and exits
	// A FlagSet of our own: the global one also holds the flags that linked-in
	// packages (cadvisor, for the kubelet) register at init.
	fl := flag.NewFlagSet(os.Args[0], flag.ExitOnError)
	dir := fl.String("dir", "", "state directory (required)")
	port := fl.Int("port", 0, "secure port on 127.0.0.1 (0 = pick a free one)")
	controllers := fl.Bool("controllers", true, "run the in-process controllers (see controllers.go)")
	fl.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: %s --dir DIR [--port N] [-- kube-apiserver flags...]\n", os.Args[0])
		fmt.Fprintf(os.Stderr, "       %s kubelet|kube-scheduler|kube-controller-manager [flags...]\n", os.Args[0])
		fmt.Fprintf(os.Stderr, "       %s cri-clean --endpoint unix:///path/to/containerd.sock\n", os.Args[0])
		fl.PrintDefaults()
	}
	_ = fl.Parse(os.Args[1:])
	if *dir == "" {
		fl.Usage()
		os.Exit(2)
	}
	if err := run(*dir, *port, *controllers, fl.Args()); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-test-apiserver: %v\n", err)
		os.Exit(1)
	}
}

func run(dir string, port int, controllers bool, extraFlags []string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	readyFile := filepath.Join(dir, "ready")
	kubeconfigFile := filepath.Join(dir, "kubeconfig")
	// Never leave stale readiness markers from an earlier run behind.
	for _, f := range []string{readyFile, kubeconfigFile} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	pki, err := ensurePKI(filepath.Join(dir, "pki"))
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}

	etcd, etcdURL, err := startEtcd(dir)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer func() {
		etcd.Close()
		klog.Info("kiln-test-apiserver: etcd stopped")
	}()

	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	port = ln.Addr().(*net.TCPAddr).Port
	serverURL := "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(port))

	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + pki.dir,
		"--tls-cert-file=" + pki.path("apiserver.crt"),
		"--tls-private-key-file=" + pki.path("apiserver.key"),
		"--client-ca-file=" + pki.path("ca.crt"),
		"--token-auth-file=" + pki.path("tokens.csv"),
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=" + saIssuer,
		"--service-account-key-file=" + pki.path("sa.pub"),
		"--service-account-signing-key-file=" + pki.path("sa.key"),
		"--service-cluster-ip-range=" + serviceCIDR,
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
		"--enable-priority-and-fairness=false",
	}
	args = append(args, extraFlags...)

	s := options.NewServerRunOptions()
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("kube-apiserver flags: %w", err)
	}
	// Hand the already-bound listener over, so --port 0 has no race.
	s.SecureServing.Listener = ln
	s.SecureServing.BindPort = port

	// The same sequence as cmd/kube-apiserver (NewAPIServerCommand), minus
	// cobra and its own signal handling.
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	featureGate := s.GenericServerRunOptions.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return err
	}
	completed, err := s.Complete(ctx)
	if err != nil {
		return err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return utilerrors.NewAggregate(errs)
	}
	featureGate.(featuregate.MutableFeatureGate).AddMetrics()

	apiErr := make(chan error, 1)
	go func() { apiErr <- app.Run(ctx, completed) }()

	if err := waitReady(ctx, serverURL, pki, apiErr); err != nil {
		return err
	}
	if controllers {
		if err := startControllers(ctx, pki.restConfig(serverURL)); err != nil {
			return err
		}
	}
	if err := writeKubeconfig(kubeconfigFile, serverURL, pki); err != nil {
		return err
	}
	if err := writeAtomic(readyFile, []byte(serverURL+"\n"), 0o644); err != nil {
		return err
	}
	klog.Infof("kiln-test-apiserver: ready at %s, kubeconfig %s", serverURL, kubeconfigFile)

	var runErr error
	select {
	case runErr = <-apiErr: // died on its own
	case <-ctx.Done():
		klog.Info("kiln-test-apiserver: signal received, shutting down")
		select {
		case runErr = <-apiErr:
		case <-time.After(60 * time.Second):
			runErr = errors.New("kube-apiserver did not shut down within 60s")
		}
	}
	_ = os.Remove(readyFile)
	if ctx.Err() == nil && runErr == nil {
		runErr = errors.New("kube-apiserver exited unexpectedly")
	}
	return runErr
}

// waitReady polls /readyz as the admin until it answers 200.
func waitReady(ctx context.Context, serverURL string, pki *pkiFiles, apiErr <-chan error) error {
	tlsCfg, err := pki.clientTLS()
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsCfg}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		resp, err := client.Get(serverURL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver not ready after 5m (last: %v)", err)
		}
		select {
		case err := <-apiErr:
			return fmt.Errorf("kube-apiserver exited before becoming ready: %v", err)
		case <-ctx.Done():
			return errors.New("interrupted before ready")
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func startEtcd(dir string) (*embed.Etcd, string, error) {
	dataDir := filepath.Join(dir, "etcd")
	if err := os.RemoveAll(dataDir); err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, "", err
	}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		ports, err := freePorts(2)
		if err != nil {
			return nil, "", err
		}
		clientURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))}
		peerURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1]))}
		cfg := embed.NewConfig()
		cfg.Name = "kiln-test"
		cfg.Dir = dataDir
		cfg.UnsafeNoFsync = true // test data only; much faster
		// Without this (0 in a bare embed.Config) etcd logs every request.
		cfg.WarningUnaryRequestDuration = time.Second
		cfg.ListenClientUrls = []url.URL{clientURL}
		cfg.AdvertiseClientUrls = []url.URL{clientURL}
		cfg.ListenPeerUrls = []url.URL{peerURL}
		cfg.AdvertisePeerUrls = []url.URL{peerURL}
		cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
		cfg.Logger = "zap"
		cfg.LogLevel = "warn"
		cfg.LogOutputs = []string{filepath.Join(dir, "etcd.log")}
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			lastErr = err
			_ = os.RemoveAll(dataDir)
			_ = os.MkdirAll(dataDir, 0o700)
			continue // most likely a port race
		}
		select {
		case <-e.Server.ReadyNotify():
			return e, clientURL.String(), nil
		case err := <-e.Err():
			e.Close()
			return nil, "", err
		case <-time.After(60 * time.Second):
			e.Close()
			return nil, "", errors.New("etcd not ready after 60s")
		}
	}
	return nil, "", lastErr
}

func freePorts(n int) ([]int, error) {
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// ---- PKI ----

type pkiFiles struct{ dir string }

func (p *pkiFiles) path(name string) string { return filepath.Join(p.dir, name) }

func (p *pkiFiles) read(name string) []byte {
	b, err := os.ReadFile(p.path(name))
	if err != nil {
		panic(err) // ensurePKI checked they all exist
	}
	return b
}

func (p *pkiFiles) clientTLS() (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(p.read("ca.crt")) {
		return nil, errors.New("bad ca.crt")
	}
	pair, err := tls.X509KeyPair(p.read("admin.crt"), p.read("admin.key"))
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}, nil
}

func (p *pkiFiles) restConfig(serverURL string) *rest.Config {
	return &rest.Config{
		Host: serverURL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   p.read("ca.crt"),
			CertData: p.read("admin.crt"),
			KeyData:  p.read("admin.key"),
		},
	}
}

var pkiNames = []string{"ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "admin.crt", "admin.key", "sa.key", "sa.pub", "admin.token", "tokens.csv"}

// ensurePKI reuses DIR/pki if every file is there, else generates all of it.
// RSA-2048 keys everywhere and PKCS#1 private keys, like kubeadm: every TLS
// stack (Go, rustls, OpenSSL) accepts them.
func ensurePKI(dir string) (*pkiFiles, error) {
	p := &pkiFiles{dir: dir}
	complete := true
	for _, n := range pkiNames {
		if _, err := os.Stat(p.path(n)); err != nil {
			complete = false
			break
		}
	}
	if complete {
		return p, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour)
	notAfter := now.Add(10 * 365 * 24 * time.Hour)

	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "kiln-test-ca"},
		NotBefore:             now,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}

	leaf := func(name string, tmpl *x509.Certificate) error {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		tmpl.SerialNumber = serial()
		tmpl.NotBefore = now
		tmpl.NotAfter = notAfter
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		tmpl.BasicConstraintsValid = true
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
		if err != nil {
			return err
		}
		if err := writePEM(p.path(name+".crt"), "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
		return writePEM(p.path(name+".key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600)
	}
	if err := leaf("apiserver", &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP("10.0.0.1")},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
	}); err != nil {
		return nil, err
	}
	if err := leaf("admin", &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kiln-admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return nil, err
	}

	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, err
	}
	if err := writePEM(p.path("sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey), 0o600); err != nil {
		return nil, err
	}
	if err := writePEM(p.path("sa.pub"), "PUBLIC KEY", saPub, 0o644); err != nil {
		return nil, err
	}

	tok := make([]byte, 24)
	if _, err := rand.Read(tok); err != nil {
		return nil, err
	}
	token := hex.EncodeToString(tok)
	if err := os.WriteFile(p.path("tokens.csv"), []byte(token+`,kiln-admin-token,kiln-admin-token,"system:masters"`+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.path("admin.token"), []byte(token+"\n"), 0o600); err != nil {
		return nil, err
	}
	// Written last: the marker ensurePKI checks first on the next start.
	if err := writePEM(p.path("ca.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(caKey), 0o600); err != nil {
		return nil, err
	}
	if err := writePEM(p.path("ca.crt"), "CERTIFICATE", caDER, 0o644); err != nil {
		return nil, err
	}
	return p, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err)
	}
	return n.Add(n, big.NewInt(1))
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return writeAtomic(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func writeKubeconfig(path, serverURL string, pki *pkiFiles) error {
	token := string(pki.read("admin.token"))
	if len(token) > 0 && token[len(token)-1] == '\n' {
		token = token[:len(token)-1]
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[clusterName] = &clientcmdapi.Cluster{
		Server:                   serverURL,
		CertificateAuthorityData: pki.read("ca.crt"),
	}
	cfg.AuthInfos["kiln-admin"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: pki.read("admin.crt"),
		ClientKeyData:         pki.read("admin.key"),
	}
	cfg.AuthInfos["kiln-admin-token"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts[clusterName] = &clientcmdapi.Context{Cluster: clusterName, AuthInfo: "kiln-admin", Namespace: "default"}
	cfg.Contexts[clusterName+"-token"] = &clientcmdapi.Context{Cluster: clusterName, AuthInfo: "kiln-admin-token", Namespace: "default"}
	cfg.CurrentContext = clusterName
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return err
	}
	return writeAtomic(path, data, 0o600)
}
