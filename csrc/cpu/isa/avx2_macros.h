// The ISA macros of AVX2 + FMA + F16C, for a file whose target is raised by #pragma GCC target: GCC's pragma does
// not define them, and ATen's vector headers (and Sleef's declarations) key on them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
