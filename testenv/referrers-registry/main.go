// Command referrers-registry serves go-containerregistry's in-process registry (the one
// `crane registry serve` runs) with the OCI 1.1 referrers API switched on, which crane's
// command leaves off. GKM's tests use it to cover signatures attached as referrers.
//
//	referrers-registry --address=127.0.0.1:5000 --disk=/tmp/blobs
//
// It logs one line per request, like crane, so tests can assert what was fetched.
package main

import (
	"flag"
	"log"
	"net"
	"net/http"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

func main() {
	address := flag.String("address", "127.0.0.1:0", "address to listen on")
	disk := flag.String("disk", "", "folder to store blobs in (default: memory)")
	flag.Parse()

	listener, err := net.Listen("tcp", *address)
	if err != nil {
		log.Fatalln(err)
	}
	opts := []registry.Option{registry.WithReferrersSupport(true)}
	if *disk != "" {
		log.Printf("storing blobs in %s", *disk)
		opts = append(opts, registry.WithBlobHandler(registry.NewDiskBlobHandler(*disk)))
	}
	s := &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		Handler:           registry.New(opts...),
	}
	log.Printf("serving on %s with the referrers API", listener.Addr())
	log.Fatalln(s.Serve(listener))
}
