// Command kleidi-agent runs on each control-plane node beside the kleidi plugin (see package internal/agent).
// It talks to the plugin over the plugin's admin socket (kleidi-server serve --admin-socket, allowing this
// agent's uid with --admin-allowed-uids) and to the cluster with its kubeconfig (--kubeconfig, $KUBECONFIG, or
// the in-cluster service account). Run it as a non-root uid.
package main

import (
	"flag"
	"fmt"
	"os"

	ctrl "sigs.k8s.io/controller-runtime"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kleidi-kms/kleidi/admin"
	"github.com/kleidi-kms/kleidi/operator/internal/agent"
	"github.com/kleidi-kms/kleidi/operator/internal/cmdutil"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kleidi-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	// --kubeconfig is registered by controller-runtime's config package.
	nodeName := flag.String("node-name", os.Getenv("NODE_NAME"), "this node's `name`, the name of its KleidiNode; default $NODE_NAME")
	socket := flag.String("admin-socket", "unix:///run/kleidi/admin.sock", "the plugin's admin `socket`")
	probeAddr := flag.String("health-probe-bind-address", "0", "`address` of /healthz and /readyz; 0 turns it off")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *version {
		fmt.Println(cmdutil.VersionString("kleidi-agent"))
		return nil
	}
	log, err := cmdutil.Logger(*logLevel)
	if err != nil {
		return err
	}
	ctrl.SetLogger(log)
	if *nodeName == "" {
		return fmt.Errorf("--node-name (or $NODE_NAME) is required")
	}
	if os.Geteuid() == 0 {
		log.Info("running as root: run the agent as a uid of its own, allowed on the plugin's admin socket with --admin-allowed-uids")
	}
	plugin, err := admin.Dial(*socket)
	if err != nil {
		return err
	}
	defer plugin.Close()
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 cmdutil.Scheme(),
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: *probeAddr,
	})
	if err != nil {
		return err
	}
	a := &agent.Agent{Client: mgr.GetClient(), Plugin: plugin, NodeName: *nodeName, Log: log.WithName("agent")}
	if err := a.SetupWithManager(mgr); err != nil {
		return err
	}
	log.Info("starting", "version", cmdutil.VersionString("kleidi-agent"), "node", *nodeName, "adminSocket", *socket)
	return mgr.Start(ctrl.SetupSignalHandler())
}
