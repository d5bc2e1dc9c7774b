# The KVM probe's guest payload (see probe.rs): a 64 KiB "BIOS" that takes the CPU from
# the reset vector through real mode, protected mode and PAE paging into long mode, the way
# a Linux kernel's boot path does, and writes a progress letter at each stage plus
# "VZK-PROBE-OK" to the ISA debug console (port 0x402), then exits through isa-debug-exit
# (port 0xf4). Broken (nested / software) KVM stops somewhere on this path.
#
# probe.rs embeds the assembled bytes (PROBE_CODE, offsets 0..237, and the reset vector at
# 0xFFF0). Rebuild and compare with:
#   as --64 -o p.o probe_payload.S && ld -m elf_x86_64 -Ttext 0 -e 0 --oformat binary -o p.bin p.o
# (the unit test `payload_matches_its_assembly_source` does exactly that when binutils is
# installed).
# Progress letters: R real mode, P protected mode, L EFER.LME set, G paging on (long mode).
# Layout: mapped at 0xF0000 (and 0xFFFF0000); reset vector at offset 0xFFF0.
        .code16
        .org 0
start16:
        cli
        cld
        mov $0x402, %dx
        mov $'R', %al
        out %al, %dx
        mov %cs, %ax
        mov %ax, %ds
        lgdtl (gdtdesc - start16)
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $0x08, $(0xF0000 + start32 - start16)
        .code32
start32:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x402, %dx
        mov $'P', %al
        out %al, %dx
        # page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD, one 2 MiB page)
        mov $0x1000, %edi
        xor %eax, %eax
        mov $0xC00, %ecx
        rep stosl
        movl $0x2003, 0x1000
        movl $0x3003, 0x2000
        movl $0x83, 0x3000
        mov %cr4, %eax
        or $0x20, %eax
        mov %eax, %cr4
        mov $0x1000, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx
        rdmsr
        or $0x100, %eax
        wrmsr
        mov $'L', %al
        mov $0x402, %dx
        out %al, %dx
        mov %cr0, %eax
        or $0x80000000, %eax
        mov %eax, %cr0
        mov $'G', %al
        out %al, %dx
        ljmp $0x18, $(0xF0000 + start64 - start16)
        .code64
start64:
        mov $0x402, %dx
        lea msg(%rip), %rsi
1:      lodsb
        test %al, %al
        jz 2f
        out %al, %dx
        jmp 1b
2:      mov $0xf4, %dx
        mov $0x00, %al
        out %al, %dx
3:      hlt
        jmp 3b
msg:    .asciz "VZK-PROBE-OK\n"
        .balign 8
gdt:    .quad 0
        .quad 0x00CF9A000000FFFF   # 0x08 code32
        .quad 0x00CF92000000FFFF   # 0x10 data
        .quad 0x00AF9A000000FFFF   # 0x18 code64
gdtdesc:
        .word gdtdesc - gdt - 1
        .long 0xF0000 + gdt - start16
        .org 0xFFF0
        .code16
reset:
        ljmp $0xF000, $0
        .org 0x10000
