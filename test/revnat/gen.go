package revnat

// Run through `make generate`, like datapath/gen.go: the objects are built in one fixed
// directory and generate-check compares them with the committed ones byte for byte.

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror" -target bpfel -type lru_addr -type lru_revnat_key lrubase ../../bpf/lrubase.c -- -I../../bpf/include -I../../bpf
