// Command vcsim runs govmomi's vCenter simulator (VPX model) with the Sendense extensions
// (see ext/sendense_ext.go, compiled into the simulator package by build-vcsim.sh).
//
// It prints one JSON line describing the server on stdout, then serves until SIGTERM/SIGINT.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func fingerprint(sum []byte) string {
	h := make([]string, len(sum))
	for i, b := range sum {
		h[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(h, ":")
}

func selfSigned(host string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: host, Organization: []string{"sendense vcsim"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = append(tmpl.DNSNames, host)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// setupDisks gives every VM nDisks disks of sizeMB MiB each, through the vSphere API.
func setupDisks(ctx context.Context, u *url.URL, nDisks int, sizeMB int64) error {
	c, err := govmomi.NewClient(ctx, u, true)
	if err != nil {
		return err
	}
	defer func() { _ = c.Logout(ctx) }()
	for _, ent := range simulator.Map.All("VirtualMachine") {
		vm := object.NewVirtualMachine(c.Client, ent.Reference())
		devices, err := vm.Device(ctx)
		if err != nil {
			return err
		}
		// Replace the model's disk by nDisks disks with the keys vSphere gives SCSI disks (2000, 2001, ...).
		disks := devices.SelectByType((*types.VirtualDisk)(nil))
		var changes []types.BaseVirtualDeviceConfigSpec
		for _, d := range disks {
			changes = append(changes, &types.VirtualDeviceConfigSpec{
				Operation:     types.VirtualDeviceConfigSpecOperationRemove,
				FileOperation: types.VirtualDeviceConfigSpecFileOperationDestroy,
				Device:        d,
			})
		}
		ctrl, err := devices.FindDiskController("scsi")
		if err != nil {
			return err
		}
		devices = devices.Select(func(d types.BaseVirtualDevice) bool {
			_, isDisk := d.(*types.VirtualDisk)
			return !isDisk
		})
		name := ent.Entity().Name
		for i := 0; i < nDisks; i++ {
			disk := devices.CreateDisk(ctrl, types.ManagedObjectReference{},
				fmt.Sprintf("[LocalDS_0] %s/disk%d.vmdk", name, i+1))
			disk.Key = int32(2000 + i)
			disk.CapacityInKB = sizeMB * 1024
			disk.CapacityInBytes = sizeMB << 20
			devices = append(devices, disk) // so that the next unit number is free
			changes = append(changes, &types.VirtualDeviceConfigSpec{
				Operation:     types.VirtualDeviceConfigSpecOperationAdd,
				FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
				Device:        disk,
			})
		}
		task, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{DeviceChange: changes})
		if err != nil {
			return err
		}
		if err := task.Wait(ctx); err != nil {
			return fmt.Errorf("reconfigure %s: %w", vm.Reference().Value, err)
		}
	}
	return nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	state := flag.String("state", "", "state directory (disk data, change logs, snapshot copies); required")
	username := flag.String("username", "user", "login user name")
	password := flag.String("password", "pass", "login password")
	vmDisks := flag.Int("vm-disks", 2, "number of virtual disks of every VM")
	diskMB := flag.Int64("disk-size-mb", 16, "capacity of every virtual disk in MiB")
	pageBytes := flag.Int64("cbt-page-bytes", 4<<20, "max span of disk covered by one QueryChangedDiskAreas answer")
	datacenters := flag.Int("datacenters", 1, "number of datacenters (DC0, DC1, ...), each with its hosts, cluster and VMs")
	flag.Parse()
	log.SetPrefix("vcsim: ")
	if *state == "" {
		log.Fatal("-state DIR is required")
	}
	stateDir, err := filepath.Abs(*state)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		log.Fatal(err)
	}
	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		log.Fatal(err)
	}

	model := simulator.VPX()
	model.Datacenter = *datacenters
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	if err := simulator.SendenseInstall(simulator.SendenseConfig{StateDir: stateDir, PageBytes: *pageBytes}); err != nil {
		log.Fatal(err)
	}

	cert, err := selfSigned(host)
	if err != nil {
		log.Fatal(err)
	}
	sha1sum := sha1.Sum(cert.Certificate[0])
	sha256sum := sha256.Sum256(cert.Certificate[0])
	thumb1, thumb256 := fingerprint(sha1sum[:]), fingerprint(sha256sum[:])
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	model.Service.HandleFunc("/sendense/manifest", simulator.SendenseManifestHandler(map[string]interface{}{
		"thumbprint": thumb1, "thumbprintSha256": thumb256,
	}))

	server := model.Service.NewServer()
	defer server.Close()

	ctx := context.Background()
	if err := setupDisks(ctx, server.URL, *vmDisks, *diskMB); err != nil {
		log.Fatalf("setting up disks: %v", err)
	}
	if err := simulator.SendensePrepareVMs(); err != nil {
		log.Fatalf("preparing disk files: %v", err)
	}
	simulator.SendenseSetHostThumbprint(thumb1)

	_, portStr, _ := net.SplitHostPort(server.URL.Host)
	port, _ := strconv.Atoi(portStr)
	u := *server.URL
	u.User = nil
	info := map[string]interface{}{
		"url":              u.String(),
		"host":             server.URL.Hostname(),
		"port":             port,
		"username":         *username,
		"password":         *password,
		"thumbprint":       thumb1,
		"thumbprintSha256": thumb256,
		"stateDir":         stateDir,
		"pid":              os.Getpid(),
		"vms":              simulator.SendenseManifest(),
	}
	line, err := json.Marshal(info)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stateDir, "vcsim.json"), append(line, '\n'), 0o644); err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(line))
	_ = os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
