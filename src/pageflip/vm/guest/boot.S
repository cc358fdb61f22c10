/*
 * pfguest boot: PVH entry (32-bit flat protected mode, paging off) -> long mode -> ring 3.
 *
 * A loader enters pvh_start through the XEN_ELFNOTE_PHYS32_ENTRY note with %ebx = the
 * physical address of hvm_start_info. Here we identity-map the first 16 MiB (2 MiB pages,
 * user-accessible) and enter long mode; kinit (main.c) then maps the start info, every RAM
 * range of the memory map (up to MAX_GIB) and the local APIC, and ring 3 runs the workload.
 * Ring 0 does only the setup and tiny handlers (timer tick, UD2 "system calls"), because on
 * a PVM host guest ring 0 is emulated while ring 3 runs natively.
 */
#define KCODE 0x08
#define KDATA 0x10
#define UDATA 0x1b
#define UCODE 0x23
#define MAX_GIB 64                      /* keep in sync with main.c */

        .section .note.Xen, "a", @note
        .align 4
        .long 4                         /* namesz */
        .long 4                         /* descsz */
        .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_start
        .align 4

        .section .text.boot, "ax"
        .code32
        .globl pvh_start
pvh_start:
        cli
        cld
        movl %ebx, start_info_ptr
        movl $kstack_top, %esp
        movl $pdpt, %eax                /* PML4[0] -> pdpt */
        orl $0x7, %eax
        movl %eax, pml4
        movl $pds, %eax                 /* PDPT[0] -> pds (first GiB) */
        orl $0x7, %eax
        movl %eax, pdpt
        xorl %ecx, %ecx                 /* 8 x 2 MiB identity pages, P|RW|US|PS */
1:      movl %ecx, %eax
        shll $21, %eax
        orl $0x87, %eax
        movl %eax, pds(,%ecx,8)
        incl %ecx
        cmpl $8, %ecx
        jb 1b
        movl %cr4, %eax
        orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* EFER.LME */
        rdmsr
        orl $0x100, %eax
        wrmsr
        movl %cr0, %eax
        andl $0x9fffffff, %eax          /* clear CD, NW */
        orl $0x80000001, %eax           /* PG | PE */
        movl %eax, %cr0
        lgdt gdt_desc
        ljmp $KCODE, $long_entry

        .code64
long_entry:
        movw $KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorw %ax, %ax
        movw %ax, %fs
        movw %ax, %gs
        movq $kstack_top, %rsp
        call kinit
        /* drop to ring 3: IF=0 (ring 3 is never interrupted), IOPL=3 (harmless: ring-3
         * port I/O faults on PVM anyway, so every port access goes through ring 0) */
        pushq $UDATA
        pushq $ustack_top
        pushq $0x3002
        pushq $UCODE
        pushq $umain
        iretq

/* ---- interrupt handlers (ring 0) ---- */
        .globl isr_timer
isr_timer:                              /* LAPIC timer tick: EOI and return */
        pushq %rax
        movabsq $0xfee000b0, %rax
        movl $0, (%rax)
        popq %rax
        iretq

/*
 * "System calls" from ring 3 are UD2 instructions (#UD, vector 6). On a PVM host ring-3
 * I/O instructions fault (#GP, IOPL ignored), "int $n" becomes #UD and code after SYSCALL
 * cannot do port I/O, but exception handlers are emulated faithfully, so ring 3 traps in
 * with UD2 and ring 0 does the privileged work:
 *   rax=0 sleep until the next interrupt (sti; hlt; cli)
 *   1 outb(rdi=port, rsi=value)   2 inb(rdi) -> rax   3 inl(rdi) -> rax
 *   4 write(rdi=buf, rsi=len) to COM1: wait for LSR.THRE, then up to serial_burst bytes
 *     with one rep outsb (a string I/O exit of count up to 16, or one exit per byte where
 *     the host emulates it so), and so on; then one more LSR read
 *   5 stop for good: cli; hlt (mask the LAPIC timer first, with call 7)
 *   6 LAPIC read(rdi=register offset) -> rax   7 LAPIC write(rdi=offset, rsi=value)
 * Clobbers rcx, rdx, rdi, rsi.
 */
        .globl exc6
exc6:
        pushq %rdx
        movq 8(%rsp), %rdx              /* faulting rip */
        cmpw $0x0b0f, (%rdx)            /* ud2 = 0f 0b */
        jne 18f
        addq $2, 8(%rsp)                /* resume after ud2 */
        cmpq $7, %rax
        ja 19f
        movl %edi, %edx
        jmp *sys_table(,%rax,8)
10:     sti
        hlt
        cli
        jmp 19f
11:     movl %esi, %eax
        outb %al, %dx
        jmp 19f
12:     xorl %eax, %eax
        inb %dx, %al
        jmp 19f
13:     inl %dx, %eax
        jmp 19f
14:     xchgq %rdi, %rsi                /* rsi = buffer (for outsb), rdi = bytes left */
        cld
21:     movw $0x3fd, %dx                /* LSR: before each burst, and once after the last, */
        inb %dx, %al                    /* as a driver that waits for the line to be sent: */
        testq %rdi, %rdi                /* a VMM that queues the port's writes (KVM's */
        jz 19f                          /* coalesced ring) hands them out at that exit */
        testb $0x20, %al
        jz 21b
        movl serial_burst, %ecx         /* rcx = min(burst, bytes left) */
        cmpq %rdi, %rcx
        jbe 22f
        movq %rdi, %rcx
22:     subq %rcx, %rdi
        movw $0x3f8, %dx
        rep outsb                       /* one exit for the whole burst */
        jmp 21b
16:     cli
        hlt
        jmp 16b
17:     movabsq $0xfee00000, %rcx
        movl (%rcx,%rdi), %eax
        jmp 19f
20:     movabsq $0xfee00000, %rcx
        movl %esi, (%rcx,%rdi)
19:     popq %rdx
        iretq
18:     popq %rdx                       /* a real #UD */
        pushq $0
        pushq $6
        jmp exc_common

        .section .rodata
        .align 8
sys_table:
        .quad 10b, 11b, 12b, 13b, 14b, 16b, 17b, 20b
        .text

        .globl isr_spurious
isr_spurious:
        iretq

.macro EXC_NOERR n
        .globl exc\n
exc\n:  pushq $0
        pushq $\n
        jmp exc_common
.endm
.macro EXC_ERR n
        .globl exc\n
exc\n:  pushq $\n
        jmp exc_common
.endm
EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 7
EXC_ERR 8
EXC_NOERR 9
EXC_ERR 10
EXC_ERR 11
EXC_ERR 12
EXC_ERR 13
EXC_ERR 14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR 17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR 21
exc_common:
        movq %rsp, %rdi                 /* -> [vec, err, rip, cs, rflags, rsp, ss] */
        call kfault
3:      cli
        hlt
        jmp 3b

        .section .data
        .align 16
gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08 kernel code64 */
        .quad 0x00cf92000000ffff        /* 0x10 kernel data */
        .quad 0x00cff2000000ffff        /* 0x18 user data */
        .quad 0x00affa000000ffff        /* 0x20 user code64 */
        .globl tss_desc
tss_desc:
        .quad 0, 0                      /* 0x28 TSS (filled by kinit) */
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt
        .globl serial_burst
serial_burst:
        .long 1                         /* bytes per LSR.THRE: 16 with a FIFO (kinit) */

        .section .bss
        .align 4096
        .globl pml4, pdpt, pds
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip MAX_GIB*4096
        .align 16
        .skip 16384
        .globl kstack_top
kstack_top:
        .skip 65536
        .globl ustack_top
ustack_top:
        .globl start_info_ptr
start_info_ptr: .skip 8
