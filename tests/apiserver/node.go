package main

// The node half of the test cluster (tests/env/up.sh with KILN_CLUSTER=1): the
// kubelet, kube-scheduler and kube-controller-manager of the same Kubernetes
// release, linked into this binary as subcommands (hyperkube style), plus a
// small CRI client that down.sh uses to tear every Pod sandbox down:
//
//	kiln-test-apiserver kubelet [kubelet flags...]
//	kiln-test-apiserver kube-scheduler [kube-scheduler flags...]
//	kiln-test-apiserver kube-controller-manager [kube-controller-manager flags...]
//	kiln-test-apiserver cri-clean --endpoint unix:///path/containerd.sock
//
// One binary instead of three: the three components share most of their code
// with the apiserver, so this adds ~20 MB to it, against ~250 MB as separate
// binaries, and links in ~10 s instead of ~16 s (tests/env/README.md).

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register" // as in cmd/kubelet and friends
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// subcommand runs the component named by os.Args[1], if it names one, and
// exits with its status; it returns if it does not.
func subcommand() {
	if len(os.Args) < 2 {
		return
	}
	var cmd *cobra.Command
	switch os.Args[1] {
	case "kubelet":
		cmd = kubelet.NewKubeletCommand(context.Background())
	case "kube-scheduler":
		cmd = scheduler.NewSchedulerCommand()
	case "kube-controller-manager":
		cmd = kcm.NewControllerManagerCommand()
	case "cri-clean":
		os.Exit(criClean(os.Args[2:]))
	default:
		return
	}
	cmd.SetArgs(os.Args[2:])
	os.Exit(cli.Run(cmd))
}

// criClean stops and removes every Pod sandbox (and any container left) that
// the CRI runtime at --endpoint knows. Stopping a sandbox through the CRI is
// what runs the CNI DEL (veth, IPAM lease, portmap rules, the netns), so this
// leaves nothing of a Pod behind, unlike killing its processes.
func criClean(args []string) int {
	fs := flag.NewFlagSet("cri-clean", flag.ContinueOnError)
	endpoint := fs.String("endpoint", "", "CRI endpoint, unix:///path/to/containerd.sock")
	timeout := fs.Duration("timeout", 60*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil || *endpoint == "" {
		fmt.Fprintln(os.Stderr, "usage: kiln-test-apiserver cri-clean --endpoint unix:///path/to/sock [--timeout 60s]")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := grpc.NewClient(*endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "cri-clean: %v\n", err)
		return 1
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	failed := 0
	pods, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "cri-clean: list pod sandboxes: %v\n", err)
		return 1
	}
	for _, p := range pods.Items {
		name := p.Id[:12]
		if m := p.Metadata; m != nil {
			name = m.Namespace + "/" + m.Name + " (" + name + ")"
		}
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-clean: stop %s: %v\n", name, err)
			failed++
			continue
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-clean: remove %s: %v\n", name, err)
			failed++
			continue
		}
		fmt.Printf("removed pod sandbox %s\n", name)
	}
	// Removing a sandbox removes its containers; anything left is an orphan.
	cs, err := rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "cri-clean: list containers: %v\n", err)
		return 1
	}
	for _, c := range cs.Containers {
		_, _ = rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: c.Id, Timeout: 0})
		if _, err := rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: c.Id}); err != nil {
			fmt.Fprintf(os.Stderr, "cri-clean: remove container %s: %v\n", c.Id[:12], err)
			failed++
		}
	}
	if failed > 0 {
		return 1
	}
	return 0
}
