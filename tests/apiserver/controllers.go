package main

import (
	"context"
	"fmt"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/metadata/metadatainformer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/controller-manager/pkg/informerfactory"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/controller/clusterroleaggregation"
	"k8s.io/kubernetes/pkg/controller/garbagecollector"
	"k8s.io/kubernetes/pkg/controller/namespace"
	"k8s.io/kubernetes/pkg/controller/serviceaccount"
)

// startControllers runs, in this process, the few kube-controller-manager
// controllers without which the API would behave unlike a real cluster's in
// ways that tests of an operator notice, wired as cmd/kube-controller-manager
// wires them:
//
//   - clusterrole-aggregation: without it the built-in aggregated ClusterRoles
//     admin, edit and view have no rules at all, so binding them grants nothing;
//   - namespace: finalizes deleted namespaces (deletes their contents), so they
//     do not stay Terminating forever;
//   - serviceaccount: creates the "default" ServiceAccount in every namespace
//     (the ServiceAccount admission plugin rejects Pods without it);
//   - garbage collector: deletes objects whose ownerReferences owners are gone
//     (background and foreground cascading deletion). It rediscovers resource
//     types (e.g. new CRDs) every 5 s.
//
// Everything else (scheduler, kubelet, workload controllers, the token
// controller, root-CA publisher, ...) is absent: no Pod ever runs.
//
// It returns once the aggregated roles are filled in and default/default
// exists, so a caller that sees the server ready sees them too.
func startControllers(ctx context.Context, cfg *rest.Config) error {
	cfg = rest.CopyConfig(cfg)
	cfg.QPS, cfg.Burst = 200, 400
	cfg = rest.AddUserAgent(cfg, "kiln-test-controllers")
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	metadataClient, err := metadata.NewForConfig(cfg)
	if err != nil {
		return err
	}
	const resync = 12 * time.Hour
	shared := informers.NewSharedInformerFactory(client, resync)
	metadataShared := metadatainformer.NewSharedInformerFactory(metadataClient, resync)
	informersStarted := make(chan struct{})

	go clusterroleaggregation.NewClusterRoleAggregation(shared.Rbac().V1().ClusterRoles(), client.RbacV1()).Run(ctx, 2)

	go namespace.NewNamespaceController(ctx, client, metadataClient,
		client.Discovery().ServerPreferredNamespacedResources,
		shared.Core().V1().Namespaces(), 5*time.Minute, v1.FinalizerKubernetes).Run(ctx, 2)

	sac, err := serviceaccount.NewServiceAccountsController(shared.Core().V1().ServiceAccounts(),
		shared.Core().V1().Namespaces(), client, serviceaccount.DefaultServiceAccountsControllerOptions())
	if err != nil {
		return err
	}
	go sac.Run(ctx, 1)

	restMapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(client.Discovery()))
	go wait.Until(restMapper.Reset, 30*time.Second, ctx.Done())
	gc, err := garbagecollector.NewGarbageCollector(ctx, client, metadataClient, restMapper,
		garbagecollector.DefaultIgnoredResources(),
		informerfactory.NewInformerFactory(shared, metadataShared), informersStarted)
	if err != nil {
		return fmt.Errorf("garbage collector: %w", err)
	}
	go gc.Run(ctx, 5, 30*time.Second)
	go gc.Sync(ctx, client.Discovery(), 5*time.Second)

	shared.Start(ctx.Done())
	metadataShared.Start(ctx.Done())
	close(informersStarted)

	// Wait for the visible effects, so readiness implies them.
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		view, err := client.RbacV1().ClusterRoles().Get(ctx, "view", metav1.GetOptions{})
		if err != nil || len(view.Rules) == 0 {
			return false, nil
		}
		_, err = client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	if err != nil {
		return fmt.Errorf("controllers did not settle: %w", err)
	}
	klog.Info("kiln-test-apiserver: controllers running (clusterrole-aggregation, namespace, serviceaccount, garbage-collector)")
	return nil
}
