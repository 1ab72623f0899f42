# wsbridge_proto_library(NAME name PROTOS a.proto b.proto [GRPC | GRPC_ONLY] [DEPS lib...])
# Generates C++ (and gRPC stubs when GRPC is given) from protos under proto/.
# GRPC_ONLY generates only the stubs; the messages come from a library in DEPS made from
# the same protos (so code that needs only the messages does not compile the stubs).
function(wsbridge_proto_library)
  cmake_parse_arguments(A "GRPC;GRPC_ONLY" "NAME" "PROTOS;DEPS" ${ARGN})
  add_library(${A_NAME} STATIC)
  target_sources(${A_NAME} PRIVATE ${A_PROTOS})
  target_include_directories(${A_NAME} PUBLIC ${CMAKE_CURRENT_BINARY_DIR} ${Protobuf_INCLUDE_DIRS})
  target_link_libraries(${A_NAME} PUBLIC protobuf::libprotobuf ${A_DEPS})
  # Generated code draws warnings we cannot fix.
  target_compile_options(${A_NAME} PRIVATE -w)
  if(NOT A_GRPC_ONLY)
    protobuf_generate(TARGET ${A_NAME} LANGUAGE cpp
      IMPORT_DIRS ${CMAKE_CURRENT_SOURCE_DIR} ${Protobuf_INCLUDE_DIRS}
      PROTOC_OUT_DIR ${CMAKE_CURRENT_BINARY_DIR})
  endif()
  if(A_GRPC OR A_GRPC_ONLY)
    target_link_libraries(${A_NAME} PUBLIC gRPC::grpc++)
    protobuf_generate(TARGET ${A_NAME} LANGUAGE grpc
      GENERATE_EXTENSIONS .grpc.pb.h .grpc.pb.cc
      PLUGIN "protoc-gen-grpc=$<TARGET_FILE:gRPC::grpc_cpp_plugin>"
      IMPORT_DIRS ${CMAKE_CURRENT_SOURCE_DIR} ${Protobuf_INCLUDE_DIRS}
      PROTOC_OUT_DIR ${CMAKE_CURRENT_BINARY_DIR})
  endif()
endfunction()
