# One-command builds. `make image` needs root (debootstrap, chroot) on Debian.
#   make image [CONFIG=my.env] [TOKEN=...] [SIZE=2G] [OUT=deploy/image/build/spamsink.img]
#   make qcow2   the same, plus a qcow2 copy beside the raw image

CONFIG ?= deploy/spamsink.env
SIZE ?= 2G
OUT ?= deploy/image/build/spamsink.img
IMAGE_ARGS = --config $(CONFIG) --size $(SIZE) --out $(OUT) $(if $(TOKEN),--token $(TOKEN))

.PHONY: image qcow2

image:
	bash deploy/image/build.sh $(IMAGE_ARGS)

qcow2:
	bash deploy/image/build.sh $(IMAGE_ARGS) --qcow2
