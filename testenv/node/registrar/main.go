// A minimal CSI driver registrar for the test node, in the role of Kubernetes'
// node-driver-registrar (which the Go module proxy here refuses to serve): it serves
// kubelet's plugin registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1) on
// <registration dir>/<driver>-reg.sock, tells kubelet where the driver's CSI endpoint is,
// logs kubelet's verdict, and removes the socket (deregistering the driver) on SIGTERM.
//
// GKM's agent cannot serve this socket itself: kubelet's plugin watcher dials it with the
// socket path as the HTTP/2 :authority, which Rust's HTTP/2 stack (h2) rejects as a
// malformed authority (Go's accepts it).
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("kubelet registered %s", r.driver)
	} else {
		log.Printf("kubelet refused %s: %s", r.driver, s.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	driver := flag.String("driver", "csi.gkm.io", "CSI driver name")
	endpoint := flag.String("csi-endpoint", "", "the driver's CSI socket as kubelet reaches it")
	dir := flag.String("registration-dir", "", "kubelet's plugins_registry directory")
	flag.Parse()
	if *endpoint == "" || *dir == "" {
		log.Fatal("--csi-endpoint and --registration-dir are required")
	}
	sock := filepath.Join(*dir, *driver+"-reg.sock")
	if err := os.MkdirAll(*dir, 0o750); err != nil {
		log.Fatal(err)
	}
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listening on %s: %v", sock, err)
	}
	s := grpc.NewServer()
	registerapi.RegisterRegistrationServer(s, &registrar{driver: *driver, endpoint: *endpoint})
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		s.Stop()
	}()
	log.Printf("serving plugin registration for %s on %s (endpoint %s)", *driver, sock, *endpoint)
	if err := s.Serve(l); err != nil {
		log.Print(err)
	}
	_ = os.Remove(sock)
}
