"""vdisk.lab: the QEMU machine harness, the test guest builder glue, the
writer's records, and the demo programs.

The tests and ``ci/demo`` use it; nothing of the product
(the CLI, routing, the supervisor and its workers, the nbdkit, qemu_img and
replication modules, ...) imports it. It imports the product freely.

    machine.py       a QEMU guest as an owned process (serial console, QMP)
    qmp.py           the QMP client of a Machine
    accel.py         whether KVM can run a stock guest kernel here
    guest.py         builds the test guest (vm-images/), its config and markers
    records.py       verifies the guest writer's records in a region
    vdiskrun.py      runs vdisk commands and vdisk serve; reads exports and images
    writer.py        the writer workload on a guest's console, its record checks
    demokit.py       the demos' command line, output, failures and shared checks
    demo.py          python -m vdisk.lab.demo: a chain served and checked over NBD
    bootdemo.py      python -m vdisk.lab.bootdemo: the guest booted from vdisk
    lifedemo.py      python -m vdisk.lab.lifedemo: a served disk's life, then
    replicatedemo.py   its replication to a second datastore and a boot there
"""
