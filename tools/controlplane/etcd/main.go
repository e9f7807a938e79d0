// Command etcd is the etcd server of the pinned release, built for the project's tests (see
// ../build.sh).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
